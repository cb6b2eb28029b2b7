"""``eurorad``: radiology teaching cases (title, history, findings, discussion, diagnosis, figures) — §A.4, §7.

Eurorad has no public dump; the reference scripts read a scraped ``eurorad.json``. Accepted input:

* case records: ``eurorad.json`` (a list, or a dict of records) or a folder ``cases/`` / ``EURORAD_implement2/``
  of one JSON record per case; keys ``title``, ``CLINICAL_HISTORY``, ``IMAGING_FINDINGS``, ``DISCUSSION``,
  ``FINAL_DIAGNOSIS``, optional ``DIFFERENTIAL_DIAGNOSIS_LIST``, ``SECTION``, ``id``, and ``img``: a list of
  ``{img_id, img_alt2 (figure legend), ...}`` (key case and spaces do not matter: ``"Clinical History"`` works);
* figures: ``images/<title>/<img_id>.<ext>`` (also ``EURORAD/<title>/`` or ``<title>/`` at the top), where
  ``<title>`` is the sanitised title (``/ ? :`` and spaces -> ``_``; the raw title is tried too).

``--views single``: one sample per figure, captioned by its legend. ``--views multi``: one sample per case with
all its figures (up to ``max_views``), captioned by the imaging findings — the multi-view diagnosis the recipe is
named for. Offline QA: diagnosis from history + images, differential list, findings and discussion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError
from cambrian_core.data.sources import clean_text, find_image, sanitize_name, title_folder_names, unique_id

RECORD_FILES = ("eurorad.json",)
RECORD_DIRS = ("cases", "EURORAD_implement2")
IMAGE_DIRS = ("images", "EURORAD", ".")


def _norm(key: str) -> str:
    return re.sub(r"[\s\-]+", "_", key.strip()).lower()


def _differentials(value: Any) -> list[str]:
    if isinstance(value, list):
        return [clean_text(v) for v in value if clean_text(v)]
    if not clean_text(value):
        return []
    # split before whitespace is collapsed: a newline separates items as a semicolon does
    parts = re.split(r"[;\n]|,[ \t]+(?=[A-Z])", str(value))
    return [c for c in map(clean_text, parts) if c]


class EuroradConverter(Converter):
    """Eurorad case records. Options: ``records`` (file or folder name), ``max_views`` (multi, default 8)."""

    name: ClassVar[str] = "eurorad"
    prompt_name: ClassVar[str] = "eurorad"
    license: ClassVar[str | None] = "CC BY-NC-SA 4.0, © European Society of Radiology (check each case)"

    def __init__(
        self,
        src: str,
        views: Literal["single", "multi"] = "single",
        records: str | None = None,
        max_views: int = 8,
        **options: Any,
    ) -> None:
        super().__init__(src, views, **options)
        self.root = Path(src)
        self.records_name = records
        self.max_views = int(max_views)

    def _records_source(self) -> Path | None:
        names = [self.records_name] if self.records_name else [*RECORD_FILES, *RECORD_DIRS]
        for name in names:
            path = self.root / name
            if path.is_file() or (path.is_dir() and any(path.glob("*.json"))):
                return path
        return None

    def check_layout(self) -> None:
        if not self.root.is_dir():
            raise LayoutError(f"eurorad: --src {self.root} is not a folder")
        if self._records_source() is None:
            raise LayoutError(
                f"eurorad: no case records in {self.root}; expected eurorad.json (a list of records with title, "
                "CLINICAL_HISTORY, IMAGING_FINDINGS, DISCUSSION, FINAL_DIAGNOSIS, img) or cases/<case>.json, with "
                "figures in images/<title>/<img_id>.<ext>"
            )

    def _records(self) -> Iterator[tuple[str, Any]]:
        src = self._records_source()
        assert src is not None
        if src.is_dir():
            for path in sorted(src.glob("*.json")):
                try:
                    yield path.stem, json.loads(path.read_text(encoding="utf-8-sig"))
                except json.JSONDecodeError as exc:
                    yield path.stem, f"{path.name}: not JSON ({exc.msg})"
            return
        try:
            data = json.loads(src.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise LayoutError(f"eurorad: {src} is not valid JSON ({exc})") from None
        items = data.items() if isinstance(data, dict) else enumerate(data)
        for key, rec in items:
            yield str(key), rec

    def _image_folder(self, names: list[str]) -> list[Path]:
        return [self.root / d / n for d in IMAGE_DIRS for n in names]

    def iter_cases(self) -> Iterator[Case | Reject]:
        seen: dict[str, int] = {}
        for key, raw in self._records():
            if isinstance(raw, str) or not isinstance(raw, dict):
                yield Reject(
                    self.name, key, raw if isinstance(raw, str) else f"record {key} is not an object"
                )
                continue
            rec = {_norm(k): v for k, v in raw.items()}
            raw_title = str(rec.get("title") or "")
            title = clean_text(raw_title)
            base = str(
                rec.get("id") or rec.get("case_id") or rec.get("case_number") or sanitize_name(title) or key
            )
            cid = unique_id(base, seen)
            if not title and not rec.get("img"):
                yield Reject(self.name, cid, f"record {key}: no `title` and no `img` list")
                continue
            text = {
                "title": title,
                "section": clean_text(rec.get("section")),
                "clinical_history": clean_text(rec.get("clinical_history")),
                "imaging_findings": clean_text(rec.get("imaging_findings")),
                "discussion": clean_text(rec.get("discussion")),
                "final_diagnosis": clean_text(rec.get("final_diagnosis")),
            }
            text = {k: v for k, v in text.items() if v}
            labels: dict[str, Any] = {}
            diffs = _differentials(
                rec.get("differential_diagnosis_list") or rec.get("differential_diagnosis")
            )
            if diffs:
                labels["differential_diagnosis"] = diffs
            names = title_folder_names(raw_title, base)
            folders = self._image_folder(names)
            figures, missing = [], []
            for n, img in enumerate(rec.get("img") or []):
                img = {_norm(k): v for k, v in img.items()} if isinstance(img, dict) else {"img_id": img}
                img_id = str(img.get("img_id") or "").strip()
                path = next((p for f in folders if img_id and (p := find_image(f, img_id))), None)
                if path is None:
                    missing.append(img_id or f"#{n}")
                    continue
                legend = clean_text(img.get("img_alt2") or img.get("img_alt") or img.get("caption"))
                figures.append((img_id, path, legend))
            if not figures:
                yield Reject(
                    self.name,
                    cid,
                    f"record {key}: none of its figures {missing} found (looked in folders {names} under "
                    f"{', '.join(d + '/' for d in IMAGE_DIRS)})",
                )
                continue
            if missing:
                labels["missing_figures"] = missing
            if self.views == "multi":
                figs = figures[: self.max_views]
                refs = [ImageRef(str(p), view=f"figure {i}") for i, p, _ in figs]
                legends = {f"legend_{i}": lg for i, _, lg in figs if lg}
                yield Case(self.name, cid, refs, labels=labels, text={**text, **legends})
            else:
                for img_id, path, legend in figures:
                    extra = {"caption": legend} if legend else {}
                    yield Case(
                        self.name,
                        f"{cid}/{img_id}",
                        [ImageRef(str(path))],
                        labels=dict(labels),
                        text={**text, **extra},
                    )

    def caption(self, case: Case) -> str | None:
        if len(case.images) > 1:
            return case.text.get("imaging_findings") or None
        return case.text.get("caption") or None

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        t, qa = case.text, []
        history = t.get("clinical_history")
        if t.get("final_diagnosis"):
            q = (
                f"Clinical history: {history}\nWhat is the most likely diagnosis?"
                if history
                else ("What is the most likely diagnosis?")
            )
            qa.append((q, t["final_diagnosis"]))
        diffs = case.labels.get("differential_diagnosis")
        if diffs:
            qa.append(("Which differential diagnoses should be considered?", "; ".join(diffs) + "."))
        if len(case.images) > 1 or not t.get("caption"):
            if t.get("imaging_findings"):
                qa.append(("Describe the imaging findings.", t["imaging_findings"]))
            if t.get("discussion"):
                qa.append(("Discuss the case in light of these images.", t["discussion"]))
        return qa


def register(registries: Any) -> None:
    registries.datasets.register_module(name="eurorad", module=EuroradConverter)
