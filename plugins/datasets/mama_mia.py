"""``mama_mia``: MAMA-MIA breast DCE-MRI (Duke, I-SPY1, I-SPY2, NACT) with its clinical table.

Layout (source_layouts.md §6)::

    images/<PATIENT_ID>/<patient_id>_0000.nii.gz ... _000N   0000 pre-contrast, 0001 first post-contrast, ...
    segmentations/expert/<patient_id>.nii.gz                  primary-tumour mask (optional; else automatic/)
    clinical_and_imaging_info.xlsx                            sheet "dataset_info" (or a .csv export)

Names are matched case-insensitively (both ``DUKE_001_0000`` and ``duke_001_0000`` occur). One case per
patient and phase (``--views single``) or per patient with every DCE phase (``--views multi``). Each image is
the slice through the tumour-mask centroid (the middle slice without a mask), cut in the acquisition plane the
table names (``view``: axial or sagittal). MR signal is normalised per volume.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError

from ._cells import find_ci, is_missing

TABLE = "clinical_and_imaging_info"
SHEET = "dataset_info"
SUBTYPES = {
    "luminal": "luminal",
    "luminal_a": "luminal A",
    "luminal_b": "luminal B",
    "her2_enriched": "HER2-enriched",
    "her2_pure": "HER2-pure",
    "triple_negative": "triple-negative",
}


def _phase_name(index: int) -> str:
    return "pre-contrast" if index == 0 else f"post-contrast {index}"


def _flag(value: Any) -> bool | None:
    if is_missing(value):
        return None
    try:
        return float(value) >= 0.5
    except (TypeError, ValueError):
        return str(value).strip().lower() in ("yes", "true", "positive", "pos")


def _clean(value: Any) -> Any:
    if is_missing(value):
        return None
    return value.strip() if isinstance(value, str) else value


class MamaMia(Converter):
    """MAMA-MIA (see the module docstring).

    Options:
        masks: ``"expert"`` (default; falls back to ``automatic``), ``"automatic"`` or ``"none"``.
    """

    name: ClassVar[str] = "mama_mia"
    prompt_name: ClassVar[str] = "mama_mia"
    license: ClassVar[str | None] = (
        "CC BY-NC 4.0 (MAMA-MIA; source collections CC BY 3.0/4.0, Duke CC BY-NC 4.0)"
    )

    def __init__(
        self, src: str, views: Literal["single", "multi"] = "single", masks: str = "expert", **options: Any
    ) -> None:
        super().__init__(src, views, **options)
        if masks not in ("expert", "automatic", "none"):
            raise ValueError(f"mama_mia: masks must be expert, automatic or none, got {masks!r}")
        self.root = Path(src)
        self.masks = masks

    def _layout(self) -> str:
        return (
            f"expected {self.root}/images/<PATIENT_ID>/<patient_id>_0000.nii.gz (one file per DCE phase) and "
            f"{self.root}/{TABLE}.xlsx (sheet {SHEET}) or {TABLE}.csv; optional segmentations/expert/<patient_id>.nii.gz"
        )

    def _table_path(self) -> Path | None:
        for name in (f"{TABLE}.xlsx", f"{TABLE}.csv"):
            path = find_ci(self.root, name)
            if path is not None:
                return path
        return None

    def check_layout(self) -> None:
        if not self.root.is_dir():
            raise LayoutError(f"mama_mia: --src {self.root} is not a folder; {self._layout()}")
        images = find_ci(self.root, "images")
        if images is None or not images.is_dir():
            raise LayoutError(f"mama_mia: no images/ folder in {self.root}; {self._layout()}")
        table = self._table_path()
        if table is None:
            raise LayoutError(f"mama_mia: no clinical table in {self.root}; {self._layout()}")
        header = next(iter(self._read_table(table)), None)
        if header is not None and "patient_id" not in header:
            raise LayoutError(f"mama_mia: {table} has no patient_id column; {self._layout()}")

    def _read_table(self, path: Path) -> Iterator[dict[str, Any]]:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                yield from csv.DictReader(f)
            return
        try:
            import openpyxl
        except ModuleNotFoundError as exc:  # pragma: no cover - openpyxl is in the data extra
            raise LayoutError(f"mama_mia: reading {path} needs openpyxl (`pip install openpyxl`)") from exc
        try:
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        except Exception as exc:  # zipfile.BadZipFile, InvalidFileException, ...
            raise LayoutError(
                f"mama_mia: {path} is not a readable .xlsx file ({exc}); {self._layout()}"
            ) from exc
        sheet = book[SHEET] if SHEET in book.sheetnames else book.worksheets[0]
        rows = sheet.iter_rows(values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
        for values in rows:
            if any(v is not None for v in values):
                yield dict(zip(header, values, strict=False))
        book.close()

    def _clinical(self) -> dict[str, dict[str, Any]]:
        table = self._table_path()
        if table is None:
            return {}
        return {
            str(r.get("patient_id")).strip().lower(): r
            for r in self._read_table(table)
            if r.get("patient_id")
        }

    def _mask(self, pid: str) -> Path | None:
        kinds = {"expert": ("expert", "automatic"), "automatic": ("automatic",), "none": ()}[self.masks]
        seg = find_ci(self.root, "segmentations")
        for kind in kinds:
            folder = find_ci(seg, kind) if seg else None
            for suffix in (".nii.gz", ".nii"):
                path = find_ci(folder, pid + suffix) if folder else None
                if path is not None:
                    return path
        return None

    def iter_cases(self) -> Iterator[Case | Reject]:
        clinical = self._clinical()
        images = find_ci(self.root, "images")
        if images is None:
            raise LayoutError(f"mama_mia: no images/ folder in {self.root}; {self._layout()}")
        for folder in sorted(p for p in images.iterdir() if p.is_dir()):
            pid = folder.name.upper()
            pattern = re.compile(rf"^{re.escape(folder.name)}_(\d{{4}})\.nii(\.gz)?$", re.IGNORECASE)
            by_phase: dict[int, Path] = {}
            for f in sorted(folder.iterdir()):
                m = pattern.match(f.name)
                if m is not None and (m.group(2) or int(m.group(1)) not in by_phase):
                    by_phase[int(m.group(1))] = f  # one file per phase: .nii.gz before an unpacked .nii
            phases = sorted(by_phase.items())
            if not phases:
                yield Reject(self.name, pid, f"{folder}: no <patient_id>_000N.nii[.gz] phase files")
                continue
            row = clinical.get(pid.lower(), {})
            mask = self._mask(folder.name)
            plane = str(_clean(row.get("view")) or "axial").lower()
            opts = self.image_options(slice_axis="sagittal" if plane == "sagittal" else "axial")
            if mask is not None:
                opts["mask"] = str(mask)
            refs = [
                ImageRef(str(f), kind="nifti", options=dict(opts), view=_phase_name(i)) for i, f in phases
            ]
            labels = self._labels(row, plane, mask, len(phases))
            if self.views == "multi":
                yield Case(self.name, pid, refs, labels={**labels, "phases": [i for i, _ in phases]})
            else:
                for (i, _), ref in zip(phases, refs, strict=True):
                    yield Case(self.name, f"{pid}/{i:04d}", [ref], labels={**labels, "phases": [i]})

    @staticmethod
    def _labels(row: dict[str, Any], plane: str, mask: Path | None, n_phases: int) -> dict[str, Any]:
        age = _clean(row.get("age"))
        return {
            "modality": "MR",
            "body_part": "breast",
            "plane": plane,
            "in_table": bool(row),
            "mask": None if mask is None else mask.parent.name,
            "num_phases": n_phases,
            "age": int(float(age)) if age is not None else None,
            "subtype": SUBTYPES.get(str(_clean(row.get("tumor_subtype")) or "").lower()),
            "er": _flag(row.get("er")),
            "pr": _flag(row.get("pr")),
            "her2": _flag(row.get("her2")),
            "grade": _clean(row.get("nottingham_grade")),
            "pcr": _flag(row.get("pcr")),
            "dataset": _clean(row.get("dataset")),
            "field_strength": _clean(row.get("field_strength")),
            "manufacturer": _clean(row.get("manufacturer")),
        }

    # ------------------------------------------------------------------------------------------- text

    @staticmethod
    def _receptors(labels: dict[str, Any]) -> str | None:
        parts = [
            f"{k.upper()}{'+' if labels[k] else '-'}" for k in ("er", "pr", "her2") if labels[k] is not None
        ]
        return ", ".join(parts) if parts else None

    def caption(self, case: Case) -> str | None:
        lab = case.labels
        views = [ref.view for ref in case.images]
        head = (
            f"{lab['plane'].capitalize()} breast DCE-MRI, {views[0]}"
            if len(views) == 1
            else f"{lab['plane'].capitalize()} breast DCE-MRI, {len(views)} phases ({', '.join(views)})"
        )
        who = f" of a {lab['age']}-year-old patient" if lab["age"] is not None else ""
        tumour = f"{lab['subtype']} breast cancer" if lab["subtype"] else "breast cancer"
        extras = [
            x
            for x in (self._receptors(lab), f"Nottingham grade {lab['grade']}" if lab["grade"] else None)
            if x
        ]
        tail = f" ({'; '.join(extras)})" if extras else ""
        if not lab["in_table"]:
            return f"{head}{who}." if who else f"{head}."
        return f"{head}{who} with {tumour}{tail}."

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        lab = case.labels
        qa = []
        if len(case.images) == 1:
            phase = lab["phases"][0]
            answer = (
                "Pre-contrast." if phase == 0 else f"Post-contrast (phase {phase} after contrast injection)."
            )
            qa.append(("Is this a pre-contrast or a post-contrast image?", answer))
        if lab["subtype"]:
            qa.append(
                (
                    "What is the molecular subtype of the breast tumour?",
                    f"{lab['subtype'][:1].upper()}{lab['subtype'][1:]}.",
                )
            )
        receptors = self._receptors(lab)
        if receptors:
            qa.append(("What is the hormone receptor and HER2 status?", f"{receptors}."))
        if lab["grade"]:
            qa.append(("What is the Nottingham histological grade?", f"{str(lab['grade']).capitalize()}."))
        if lab["pcr"] is not None:
            qa.append(
                (
                    "Did the patient achieve a pathologic complete response to neoadjuvant therapy?",
                    "Yes." if lab["pcr"] else "No.",
                )
            )
        return qa


def register(registries: Any) -> None:
    registries.datasets.register_module(name=MamaMia.name, module=MamaMia)
