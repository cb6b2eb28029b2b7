"""``padchest``: PadChest chest X-rays (BIMCV) with their stemmed Spanish reports and finding labels.

Layout (source_layouts.md §4)::

    PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]
    <ImageDir>/<ImageID>          ImageDir 0-50 and 54; or flat <ImageID>; or images/<ImageID> (MVD)

One case per image (``--views single``) or per study, the PA / AP / lateral films together
(``--views multi``). Images are 16-bit PNGs rescaled over their own range. Captions and QA come from
``Labels`` / ``Localizations`` / ``Projection`` / sex / age; the Spanish ``Report`` (stemmed, not a caption)
is kept as ``text["report"]`` for API generators.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError

from ._cells import CellError, csv_header, is_missing, literal_list, open_csv, to_float

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
REQUIRED = (
    "ImageID",
    "ImageDir",
    "StudyID",
    "StudyDate_DICOM",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Modality_DICOM",
    "PhotometricInterpretation_DICOM",
    "Report",
    "MethodLabel",
    "Labels",
    "Localizations",
)
#: Projection value -> (view name for multi-view prompts, phrase for captions), in display order
PROJECTIONS = {
    "PA": ("PA", "posteroanterior (PA)"),
    "AP": ("AP", "anteroposterior (AP)"),
    "AP_horizontal": ("AP supine", "anteroposterior (AP) supine"),
    "L": ("lateral", "lateral"),
    "COSTAL": ("costal", "oblique (costal)"),
}
_DROP_LABELS = {"", "exclude"}
#: labels about the image, not the patient: kept apart from the findings
_QUALITY_LABELS = {"suboptimal study"}
_SEX = {"M": "male", "F": "female"}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class PadChest(Converter):
    """PadChest (see the module docstring).

    Options:
        csv: the labels CSV, if not in ``src`` under its release name.
        images: the image root, if not ``src``.
    """

    name: ClassVar[str] = "padchest"
    prompt_name: ClassVar[str] = "padchest"
    license: ClassVar[str | None] = "CC BY-SA 4.0 (BIMCV PadChest; access under the BIMCV terms)"

    def __init__(
        self,
        src: str,
        views: Literal["single", "multi"] = "single",
        csv: str | None = None,
        images: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(src, views, **options)
        self.csv = Path(csv) if csv else None
        self.image_root = Path(images) if images else Path(src)

    # ------------------------------------------------------------------------------------------- layout

    def _layout(self) -> str:
        return (
            f"expected {self.src}/{CSV_NAME} (or .csv.gz) and the images as {self.src}/<ImageDir>/<ImageID> "
            f"(ImageDir 0-50, 54), {self.src}/<ImageID> or {self.src}/images/<ImageID>"
        )

    def csv_path(self) -> Path:
        if self.csv is not None:
            if not self.csv.is_file():
                raise LayoutError(f"padchest: csv={self.csv} does not exist; {self._layout()}")
            return self.csv
        root = Path(self.src)
        if not root.is_dir():
            raise LayoutError(f"padchest: --src {root} is not a folder; {self._layout()}")
        for name in (CSV_NAME, CSV_NAME + ".gz"):
            if (root / name).is_file():
                return root / name
        found = sorted(root.glob("PADCHEST*.csv*"))
        if len(found) == 1:
            return found[0]
        raise LayoutError(f"padchest: no labels CSV in {root}; {self._layout()}")

    def check_layout(self) -> None:
        path = self.csv_path()
        header = csv_header(path)
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise LayoutError(f"padchest: {path} lacks the column(s) {', '.join(missing)}; {self._layout()}")
        if not self.image_root.is_dir():
            raise LayoutError(f"padchest: image folder {self.image_root} does not exist; {self._layout()}")

    def _find_image(self, image_dir: str, image_id: str) -> str | None:
        root = self.image_root
        for cand in (root / image_dir / image_id, root / image_id, root / "images" / image_id):
            if os.path.isfile(cand):
                return str(cand)
        return None

    # ------------------------------------------------------------------------------------------- cases

    def _row(self, row: dict[str, str]) -> dict[str, Any] | Reject:
        """The fields of one CSV row, or a Reject naming the bad column."""
        image_id = (row.get("ImageID") or "").strip()
        stem = image_id.rsplit(".", 1)[0] or image_id
        try:
            labels = literal_list(row.get("Labels"), "Labels")
            locs = literal_list(row.get("Localizations"), "Localizations") or []
            birth = to_float(row.get("PatientBirth"), "PatientBirth")
        except CellError as exc:
            return Reject(self.name, stem, f"{image_id}: {exc}")
        projection = (row.get("Projection") or "").strip()
        if projection == "EXCLUDE":
            return Reject(
                self.name, stem, f"{image_id}: Projection is EXCLUDE (marked unusable in the release)"
            )
        path = self._find_image((row.get("ImageDir") or "").strip(), image_id)
        if path is None:
            return Reject(self.name, stem, f"{image_id}: image not found under {self.image_root}")
        date = (row.get("StudyDate_DICOM") or "").strip()
        age = int(date[:4]) - int(birth) if birth is not None and date[:4].isdigit() else None
        kept = None if labels is None else [x for x in dict.fromkeys(labels) if x.lower() not in _DROP_LABELS]
        findings = None if kept is None else [x for x in kept if x.lower() not in _QUALITY_LABELS]
        suboptimal = kept is not None and len(kept) > len(findings or [])
        report = "" if is_missing(row.get("Report")) else row["Report"].strip()
        invert = (row.get("PhotometricInterpretation_DICOM") or "").strip() == "MONOCHROME1"
        return {
            "stem": stem,
            "study": (row.get("StudyID") or stem).strip(),
            "path": path,
            "projection": projection,
            "invert": invert,
            "findings": findings,
            "suboptimal": suboptimal,
            "localizations": [x.removeprefix("loc ").strip() for x in dict.fromkeys(locs) if x.strip()],
            "age": age if age is not None and 0 <= age <= 120 else None,
            "sex": _SEX.get((row.get("PatientSex_DICOM") or "").strip()),
            "modality": (row.get("Modality_DICOM") or "").strip() or None,
            "method": (row.get("MethodLabel") or "").strip() or None,
            "report": report,
        }

    def _ref(self, fields: dict[str, Any]) -> ImageRef:
        opts = self.image_options(**({"invert": True} if fields["invert"] else {}))
        view = PROJECTIONS.get(fields["projection"], (fields["projection"] or None, None))[0]
        return ImageRef(fields["path"], kind="png16", options=opts, view=view)

    def _case(self, case_id: str, rows: list[dict[str, Any]]) -> Case:
        order = list(PROJECTIONS)
        rows = sorted(
            rows, key=lambda f: order.index(f["projection"]) if f["projection"] in order else len(order)
        )
        findings = None
        if any(f["findings"] is not None for f in rows):
            findings = list(dict.fromkeys(x for f in rows for x in (f["findings"] or [])))
        first = rows[0]
        labels = {
            "modality": first["modality"],
            "body_part": "chest",
            "projections": [f["projection"] for f in rows],
            "findings": findings,
            "suboptimal_study": any(f["suboptimal"] for f in rows),
            "localizations": list(dict.fromkeys(x for f in rows for x in f["localizations"])),
            "age": first["age"],
            "sex": first["sex"],
            "label_method": first["method"],
            "report_language": "es-stemmed",
        }
        text = {"report": first["report"]} if first["report"] else {}
        return Case(self.name, case_id, [self._ref(f) for f in rows], labels=labels, text=text)

    def iter_cases(self) -> Iterator[Case | Reject]:
        studies: dict[str, list[dict[str, Any]]] = {}
        for row in open_csv(self.csv_path()):
            fields = self._row(row)
            if isinstance(fields, Reject):
                yield fields
            elif self.views == "single":
                yield self._case(fields["stem"], [fields])
            else:
                studies.setdefault(fields["study"], []).append(fields)
        for study, rows in studies.items():
            yield self._case(study, rows)

    # ------------------------------------------------------------------------------------------- text

    @staticmethod
    def _projection_phrase(case: Case) -> str:
        phrases = [PROJECTIONS[p][1] for p in case.labels["projections"] if p in PROJECTIONS]
        return _join(phrases) if phrases else ""

    @staticmethod
    def _who(case: Case) -> str:
        age, sex = case.labels.get("age"), case.labels.get("sex")
        if age is not None and sex:
            return f" of a {age}-year-old {sex}"
        if age is not None:
            return f" of a {age}-year-old patient"
        return f" of a {sex} patient" if sex else ""

    @staticmethod
    def _findings_sentence(case: Case) -> str:
        findings = case.labels["findings"]
        quality = " The study is technically suboptimal." if case.labels.get("suboptimal_study") else ""
        if findings == ["normal"]:
            return "No abnormality is reported (normal study)." + quality
        if not findings:
            return "No finding labels are recorded." + quality
        sentence = f"Findings: {_join([f for f in findings if f != 'normal'])}."
        locs = case.labels.get("localizations")
        return sentence + (f" Location: {_join(locs)}." if locs else "") + quality

    def caption(self, case: Case) -> str | None:
        if case.labels.get("findings") is None:
            return None  # Labels missing: nothing reliable to say
        proj = self._projection_phrase(case)
        n = len(case.images)
        kind = (
            f"Chest X-ray study ({proj} views)"
            if n > 1 and proj
            else f"{proj[:1].upper()}{proj[1:]} chest X-ray"
        )
        if not proj:
            kind = "Chest X-ray"
        return f"{kind}{self._who(case)}. {self._findings_sentence(case)}"

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        qa = []
        proj = self._projection_phrase(case)
        if proj and len(case.images) == 1:
            qa.append(("Which projection is this chest X-ray?", f"It is a {proj} view."))
        elif proj:
            qa.append(("Which views of the chest are shown?", f"{proj[:1].upper()}{proj[1:]} views."))
        findings = case.labels.get("findings")
        if findings is None:
            return qa
        real = [f for f in findings if f != "normal"]
        if findings == ["normal"]:
            qa.append(("Is this chest X-ray normal?", "Yes. No abnormality is reported."))
            qa.append(("What are the findings?", "There are no abnormal findings."))
        elif real:
            qa.append(("Is this chest X-ray normal?", f"No. It shows {_join(real)}."))
            qa.append(("What are the findings?", f"{_join(real)[:1].upper()}{_join(real)[1:]}."))
            if case.labels.get("localizations"):
                qa.append(("Where are the findings located?", f"{_join(case.labels['localizations'])}."))
        if case.labels.get("suboptimal_study"):  # asked only where the label says so
            qa.append(("Is the image quality of this study optimal?", "No. It is a suboptimal study."))
        return qa


def register(registries: Any) -> None:
    registries.datasets.register_module(name=PadChest.name, module=PadChest)
