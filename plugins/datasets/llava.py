"""``llava``: import an existing LLaVA-format JSON / JSONL set, validating every record (reference §A.12).

Each record must have image files that exist (relative to ``image_folder``, default the file's folder), exactly one
``<image>`` per image, and a conversation that starts with the human and alternates. ``role`` keys and
``user``/``assistant`` values (the schema drift of the reference scripts, §G.3) are normalised to ``from`` with
``human``/``gpt``; anything else becomes a reject naming the record and the problem. ``fix_image_tokens`` puts
missing ``<image>`` tokens at the start of the first human turn (records whose text holds none at all).

Through the runner the images are re-rendered as PNG and the conversation is kept turn for turn: the ``template``
generator replays ``offline_qa`` (the original pairs) as an instruction record, or ``caption`` as a caption record
when ``stage="caption"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError
from cambrian_core.data.records import IMAGE_TOKEN, conversation_problem, iter_records, record_images
from cambrian_core.data.sources import unique_id

ROLE_NAMES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "model": "gpt"}


def normalise_turns(conv: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """``conversations`` with ``from: human|gpt`` keys, or ``(None, reason)``."""
    if not isinstance(conv, list):
        return None, "`conversations` is missing or not a list"
    out = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return None, f"turn {i} is not an object"
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role is None or value is None:
            return None, f"turn {i} needs `from` (or `role`) and `value`; it has {sorted(turn)}"
        name = ROLE_NAMES.get(str(role).lower())
        if name is None:
            return None, f"turn {i} has role {role!r}; expected human/user or gpt/assistant"
        if not isinstance(value, str):
            return None, f"turn {i} value is a {type(value).__name__}, not text"
        out.append({"from": name, "value": value})
    return out, None


class LlavaConverter(Converter):
    """LLaVA JSON/JSONL importer. Options: ``file`` (when ``src`` is a folder), ``image_folder``, ``stage``
    (``instruct`` or ``caption``), ``fix_image_tokens`` (default False)."""

    name: ClassVar[str] = "llava"
    prompt_name: ClassVar[str] = "generic"

    def __init__(
        self,
        src: str,
        views: Literal["single", "multi"] = "single",
        file: str | None = None,
        image_folder: str | None = None,
        stage: Literal["instruct", "caption"] = "instruct",
        fix_image_tokens: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(src, views, **options)
        if stage not in ("instruct", "caption"):
            raise ValueError(f"llava: stage must be 'instruct' or 'caption', got {stage!r}")
        self.file_name = file
        self.image_folder = image_folder
        self.stage = stage
        self.fix_image_tokens = bool(fix_image_tokens)

    def path(self) -> Path:
        src = Path(self.src)
        if src.is_file():
            return src
        if self.file_name:
            return src / self.file_name
        found = sorted(p for p in src.glob("*") if p.suffix in (".json", ".jsonl")) if src.is_dir() else []
        if len(found) != 1:
            names = [p.name for p in found]
            raise LayoutError(
                f"llava: --src {src} must be a .json/.jsonl file, or a folder holding exactly one (found {names}); "
                "name it with file=<name>"
            )
        return found[0]

    def check_layout(self) -> None:
        path = self.path()
        if not path.is_file():
            raise LayoutError(f"llava: record file {path} does not exist (expected LLaVA JSON or JSONL)")
        root = Path(self.image_folder) if self.image_folder else path.parent
        if not root.is_dir():
            raise LayoutError(f"llava: image_folder {root} is not a folder")

    def iter_cases(self) -> Iterator[Case | Reject]:
        path = self.path()
        root = Path(self.image_folder) if self.image_folder else path.parent
        seen: dict[str, int] = {}
        for n, rec in iter_records(path):
            where = f"{path.name} {'item' if path.suffix == '.json' else 'line'} {n}"
            if isinstance(rec, str):
                yield Reject(self.name, f"#{n}", f"{path.name}: {rec}")
                continue
            cid = unique_id(str(rec.get("id") or f"#{n}"), seen)
            # LLaVA-Med files (PathVQA...) spell the key `conversatons` (vqa_formats.md §5)
            conv = rec["conversations"] if "conversations" in rec else rec.get("conversatons")
            turns, problem = normalise_turns(conv)
            if turns is None:
                yield Reject(self.name, cid, f"{where}: {problem}")
                continue
            images = record_images(rec)
            missing = [p for p in images if not (root / p).is_file()]
            if missing:
                yield Reject(self.name, cid, f"{where}: image file(s) {missing[:3]} not found under {root}")
                continue
            tokens = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
            if self.fix_image_tokens and tokens == 0 and images and turns[0]["from"] == "human":
                turns[0] = {"from": "human", "value": f"{IMAGE_TOKEN}\n" * len(images) + turns[0]["value"]}
            candidate = {"image": images, "conversations": turns} if images else {"conversations": turns}
            problem = conversation_problem(candidate)
            if problem:
                yield Reject(self.name, cid, f"{where}: {problem}")
                continue
            pairs = [
                (turns[i]["value"].replace(IMAGE_TOKEN, "").strip(), turns[i + 1]["value"].strip())
                for i in range(0, len(turns), 2)
            ]
            labels = {"conversations": pairs, "original_id": rec.get("id")}
            yield Case(self.name, cid, [ImageRef(str(root / p)) for p in images], labels=labels)

    def caption(self, case: Case) -> str | None:
        if self.stage != "caption":
            return None
        return case.labels["conversations"][0][1]

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        return [] if self.stage == "caption" else [tuple(p) for p in case.labels["conversations"]]


def register(registries: Any) -> None:
    registries.datasets.register_module(name="llava", module=LlavaConverter)
