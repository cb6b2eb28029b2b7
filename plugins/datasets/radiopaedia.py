"""``radiopaedia``: Radiopaedia reference cases, mapping-driven (reference §A.8, layout §8).

Radiopaedia publishes no dump and the reference scripts' CSV columns are unknown, so this converter reads case
records in CSV, JSON (a list) or JSONL and maps *our* fields to *their* columns through ``mapping`` (defaults
cover the common names). Fields: ``case_id`` (rID), ``title``, ``presentation``, ``age``, ``sex``, ``system``,
``modality``, ``findings``, ``discussion``, ``diagnosis``, ``images`` and ``studies``.

Images come from, in order: the record's ``studies`` (a list of ``{modality, findings, images | series: [{plane,
images}]}``), its ``images`` cell (a JSON / Python list, or paths separated by ``;`` or ``|``; relative to the
source folder or to ``images/``), or every image in the case folder ``<title>/`` or ``images/<title>/``
(sanitised title, as the reference scripts named it) or ``<case_id>/``.

``--views single``: one sample per image. ``--views multi``: one sample per study (per case when it has no
studies), up to ``max_views`` images.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError
from cambrian_core.data.sources import (
    IMAGE_EXTENSIONS,
    clean_text,
    literal_list,
    read_csv,
    sanitize_name,
    title_folder_names,
    unique_id,
)
from cambrian_core.fileio import jsonl_lines

#: our field -> candidate source column names (first present wins, case-insensitive)
DEFAULT_MAPPING: dict[str, list[str]] = {
    "case_id": ["rid", "case_id", "id", "case_number"],
    "title": ["title", "case_title", "name"],
    "presentation": ["presentation", "clinical_presentation", "clinical_history", "history"],
    "age": ["age", "patient_age"],
    "sex": ["sex", "gender", "patient_sex"],
    "system": ["system", "systems"],
    "modality": ["modality", "modalities"],
    "findings": ["findings", "study_findings", "imaging_findings"],
    "discussion": ["discussion", "case_discussion"],
    "diagnosis": ["diagnosis", "final_diagnosis"],
    "images": ["images", "image_paths", "image_files", "image"],
    "studies": ["studies"],
}
RECORD_GLOBS = (
    "*radiopaedia*.jsonl",
    "*radiopaedia*.json",
    "*radiopaedia*.csv",
    "cases.jsonl",
    "cases.json",
    "cases.csv",
)


def _norm(name: str) -> str:
    """Column names compare case-, space- and dash-insensitively: "Study Findings" == "study_findings"."""
    return re.sub(r"[\s\-]+", "_", str(name).strip()).lower()


def _paths(cell: Any) -> list[str]:
    if isinstance(cell, list):
        return [str(c) for c in cell if str(c).strip()]
    text = "" if cell is None else str(cell).strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            return [str(c) for c in json.loads(text)]
        except json.JSONDecodeError:
            return [str(c) for c in literal_list(text)]
    return [p.strip() for p in re.split(r"[;|]", text) if p.strip()]


def _parse_cell(text: str, column: str) -> Any:
    """A structured cell written as JSON or as a Python literal (single quotes, as the source CSVs' list cells)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        try:
            return ast.literal_eval(text)  # a literal parser: never evaluates code
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(
                f"column {column}: neither JSON ({exc.msg} at char {exc.pos}) nor a Python literal: {text[:60]!r}"
            ) from None


class RadiopaediaConverter(Converter):
    """Radiopaedia cases. Options: ``records`` (file name), ``mapping`` ({our field: source column}),
    ``max_views`` (multi, default 8)."""

    name: ClassVar[str] = "radiopaedia"
    prompt_name: ClassVar[str] = "radiopaedia"
    license: ClassVar[str | None] = "CC BY-NC-SA 3.0, attribution: contributor, Radiopaedia.org, rID"

    def __init__(
        self,
        src: str,
        views: Literal["single", "multi"] = "single",
        records: str | None = None,
        mapping: dict[str, str] | None = None,
        max_views: int = 8,
        **options: Any,
    ) -> None:
        super().__init__(src, views, **options)
        unknown = sorted(set(mapping or {}) - set(DEFAULT_MAPPING))
        if unknown:
            raise ValueError(
                f"radiopaedia: unknown mapping field(s) {unknown}; fields: {sorted(DEFAULT_MAPPING)}"
            )
        self.root = Path(src)
        self.records_name = records
        self.mapping = {k: [v] for k, v in (mapping or {}).items()}
        self.max_views = int(max_views)

    def records_path(self) -> Path | None:
        if self.records_name:
            return self.root / self.records_name
        for pattern in RECORD_GLOBS:
            found = sorted(self.root.glob(pattern))
            if found:
                return found[0]
        return None

    def check_layout(self) -> None:
        path = self.records_path()
        if not self.root.is_dir() or path is None or not path.is_file():
            raise LayoutError(
                f"radiopaedia: no case records in {self.root}; expected a *radiopaedia*.csv/.json/.jsonl (or "
                "cases.*) file of case records, plus images in <title>/ or images/<title>/ or paths in an "
                "`images` column; map your column names with mapping={'findings': 'your_column', ...}"
            )
        if path.suffix == ".csv":
            header, _ = read_csv(path)
            lower = {_norm(h) for h in header}
            for field in ("findings", "title"):
                cands = self.mapping.get(field) or DEFAULT_MAPPING[field]
                if not any(_norm(c) in lower for c in cands):
                    raise LayoutError(
                        f"radiopaedia: {path.name} has no column for `{field}` (tried {cands}); its header is "
                        f"{header[:15]}; pass mapping={{'{field}': '<column>'}}"
                    )

    def _rows(self, path: Path) -> Iterator[tuple[str, Any]]:
        if path.suffix == ".csv":
            _, rows = read_csv(path)
            for n, row in rows:
                yield f"row {n + 1}", row
        elif path.suffix == ".jsonl":
            for n, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8-sig")), 1):
                if line.strip():
                    try:
                        yield f"line {n}", json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield f"line {n}", f"not JSON ({exc.msg})"
        else:
            try:
                data = json.loads(path.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as exc:
                raise LayoutError(
                    f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the file "
                    "or give the records as .csv / .jsonl"
                ) from exc
            for n, rec in enumerate(data if isinstance(data, list) else list(data.values())):
                yield f"item {n}", rec

    def _get(self, rec: dict[str, Any], field: str) -> Any:
        lower = {_norm(k): v for k, v in rec.items()}
        for cand in self.mapping.get(field) or DEFAULT_MAPPING[field]:
            value = lower.get(_norm(cand))
            if value not in (None, "", []):
                return value
        return None

    def _resolve(self, rel: str) -> Path | None:
        for base in (self.root, self.root / "images"):
            p = base / rel
            if p.is_file():
                return p
        return None

    def _folder_images(self, names: list[str]) -> list[Path]:
        for base in (self.root, self.root / "images"):
            for name in names:
                folder = base / name
                if folder.is_dir():
                    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        return []

    def _studies(self, rec: dict[str, Any], folders: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """``[{modality, findings, images: [(path, view)]}]`` and the image paths that were not found.

        Raises ``ValueError`` naming the column when the ``studies`` cell is neither JSON nor a Python literal.
        """
        missing: list[str] = []

        def resolve(items: list[str], view: str | None) -> list[tuple[Path, str | None]]:
            out = []
            for rel in items:
                p = self._resolve(rel)
                if p is None:
                    missing.append(rel)
                else:
                    out.append((p, view))
            return out

        studies_cell = self._get(rec, "studies")
        studies = _parse_cell(studies_cell, "studies") if isinstance(studies_cell, str) else studies_cell
        if isinstance(studies, list) and studies:
            out = []
            for s in studies:
                if not isinstance(s, dict):
                    continue
                imgs = resolve(_paths(s.get("images")), clean_text(s.get("plane")) or None)
                for series in s.get("series") or []:
                    if isinstance(series, dict):
                        view = clean_text(series.get("plane") or series.get("name")) or None
                        imgs += resolve(_paths(series.get("images")), view)
                out.append(
                    {
                        "modality": clean_text(s.get("modality")),
                        "findings": clean_text(s.get("findings")),
                        "images": imgs,
                    }
                )
            return out, missing
        listed = _paths(self._get(rec, "images"))
        imgs = resolve(listed, None) if listed else [(p, None) for p in self._folder_images(folders)]
        modality = self._get(rec, "modality")
        return [
            {
                "modality": clean_text(modality),
                "findings": clean_text(self._get(rec, "findings")),
                "images": imgs,
            }
        ], missing

    def iter_cases(self) -> Iterator[Case | Reject]:
        path = self.records_path()
        assert path is not None
        seen: dict[str, int] = {}
        for where, rec in self._rows(path):
            if not isinstance(rec, dict):
                yield Reject(
                    self.name,
                    where,
                    f"{path.name} {where}: {rec if isinstance(rec, str) else 'not an object'}",
                )
                continue
            raw_title = str(self._get(rec, "title") or "")
            title = clean_text(raw_title)
            cid = unique_id(str(self._get(rec, "case_id") or sanitize_name(title) or where), seen)
            folders = title_folder_names(raw_title, cid)
            try:
                studies, missing = self._studies(rec, folders)
            except ValueError as exc:
                yield Reject(self.name, cid, f"{path.name} {where}: {exc}")
                continue
            if not any(s["images"] for s in studies):
                detail = (
                    f"listed images not found: {missing[:3]}"
                    if missing
                    else f"no images listed and no case folder (looked for {folders} in . and images/)"
                )
                yield Reject(self.name, cid, f"{path.name} {where}: {detail}")
                continue
            text = {
                "title": title,
                "presentation": clean_text(self._get(rec, "presentation")),
                "discussion": clean_text(self._get(rec, "discussion")),
                "diagnosis": clean_text(self._get(rec, "diagnosis")),
            }
            labels: dict[str, Any] = {k: clean_text(self._get(rec, k)) for k in ("age", "sex", "system")}
            if missing:
                labels["missing_images"] = missing
            for k, study in enumerate(studies):
                if not study["images"]:
                    continue
                base_text = {**text, "findings": study["findings"] or clean_text(self._get(rec, "findings"))}
                base_text = {key: v for key, v in base_text.items() if v}
                study_labels = {**{key: v for key, v in labels.items() if v}, "modality": study["modality"]}
                study_labels = {key: v for key, v in study_labels.items() if v}
                sid = f"{cid}/s{k}" if len(studies) > 1 else cid
                if self.views == "multi":
                    refs = [ImageRef(str(p), view=v) for p, v in study["images"][: self.max_views]]
                    yield Case(self.name, sid, refs, labels=study_labels, text=base_text)
                else:
                    for i, (p, v) in enumerate(study["images"]):
                        yield Case(
                            self.name,
                            f"{sid}/{i}",
                            [ImageRef(str(p), view=v)],
                            labels=dict(study_labels),
                            text=dict(base_text),
                        )

    def caption(self, case: Case) -> str | None:
        return case.text.get("findings") or None

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        t, qa = case.text, []
        if t.get("diagnosis"):
            who = " ".join(x for x in (case.labels.get("age"), case.labels.get("sex")) if x)
            context = "; ".join(x for x in (who, t.get("presentation")) if x)
            q = (
                f"Presentation: {context}\nWhat is the most likely diagnosis?"
                if context
                else ("What is the most likely diagnosis?")
            )
            qa.append((q, t["diagnosis"]))
        if case.labels.get("modality"):
            qa.append(("Which imaging modality is this?", f"{case.labels['modality']}."))
        if case.labels.get("system"):
            qa.append(("Which body system does this case concern?", f"{case.labels['system']}."))
        if t.get("discussion") and len(case.images) > 1:
            qa.append(("Discuss the case in light of these images.", t["discussion"]))
        return qa


def register(registries: Any) -> None:
    registries.datasets.register_module(name="radiopaedia", module=RadiopaediaConverter)
