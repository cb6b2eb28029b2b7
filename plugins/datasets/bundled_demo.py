"""``bundled_demo``: a small real medical set assembled from files that PyPI packages ship.

Nothing here is committed: the scans come from pydicom / pydicom-data (chest CR, extremity CR, CT head, CT
pancreas, MR shoulder, MR liver, US, NM bone scan), the colour images from scikit-image (fundus, IHC,
microaneurysms), and the chest reports from the Indiana University collection inside the torchxrayvision wheel
(read as a data file; CC BY-NC-ND 4.0, so it is read at run time, never stored in the repository).

The IU reports belong to other patients' films: the demo pairs normal-study reports with the one real PA chest
CR to teach report style. It demonstrates the pipeline end to end; it says nothing about diagnostic accuracy.
"""

from __future__ import annotations

import importlib.resources
import io
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from cambrian_core.assets import AssetError, dicom_file, wheel_member, xrv_wheel
from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError

#: (file, window preset or None for the file's own VOI window, description used in captions)
DICOM_CASES: list[tuple[str, str | None, str]] = [
    ("RG3_UNCR.dcm", None, "Radiograph of the distal tibia showing a non-ossifying fibroma."),
    ("693_UNCR.dcm", "brain", "Axial non-contrast CT of the head (5 mm slice)."),
    ("explicit_VR-UN.dcm", "abdomen", "Axial CT of the abdomen at the level of the pancreas."),
    ("MR2_UNCR.dcm", None, "MR image of the shoulder."),
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", None, "Abdominal MR image of the liver with a marked lesion."),
    ("US1_UNCR.dcm", None, "Ultrasound of a lymph node with power Doppler."),
    ("JPEG2000_UNC.dcm", None, "Whole-body nuclear medicine bone scan."),
]
CHEST_DICOM = "RG1_UNCR.dcm"
SKIMAGE_CASES: list[tuple[str, str, dict[str, str]]] = [
    (
        "retina.jpg",
        "Colour fundus photograph of a normal left eye.",
        {"modality": "fundus photography", "body_part": "eye"},
    ),
    (
        "ihc.png",
        "Immunohistochemistry of colonic glands, DAB and haematoxylin stain.",
        {"modality": "histopathology", "body_part": "colon"},
    ),
    (
        "microaneurysms.png",
        "Retinal image (green channel) showing diabetic retinopathy microaneurysms.",
        {"modality": "fundus photography", "body_part": "eye"},
    ),
]
MODALITY_NAMES = {
    "CR": "computed radiography (X-ray)",
    "CT": "computed tomography (CT)",
    "MR": "magnetic resonance imaging (MRI)",
    "US": "ultrasound",
    "NM": "nuclear medicine scintigraphy",
}


def iu_reports(limit: int | None = None, normal_only: bool = True) -> list[dict[str, str]]:
    """Indiana University chest X-ray reports (FINDINGS + IMPRESSION), in report-id order."""
    tgz = wheel_member(xrv_wheel(), "NLMCXR_reports.tgz")
    reports = []
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".xml")), key=_report_number)
        for m in members:
            root = ET.fromstring(tar.extractfile(m).read())
            sections = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
            majors = [e.text or "" for e in root.iter("major")]
            if not sections.get("FINDINGS") or not sections.get("IMPRESSION"):
                continue
            if normal_only and majors != ["normal"]:
                continue
            if "XXXX" in sections["FINDINGS"] + sections["IMPRESSION"]:
                continue  # de-identification masks make poor training targets
            reports.append({"id": Path(m.name).stem, **{k.lower(): v for k, v in sections.items() if k}})
            if limit is not None and len(reports) >= limit:
                break
    return reports


def _report_number(m: tarfile.TarInfo) -> int:
    digits = re.findall(r"\d+", Path(m.name).stem)
    return int(digits[0]) if digits else 0


def _skimage_file(name: str) -> Path:
    try:
        path = Path(str(importlib.resources.files("skimage") / "data" / name))
    except ModuleNotFoundError as exc:
        raise AssetError(
            "scikit-image is not installed; `pip install scikit-image` ships the demo images"
        ) from exc
    if not path.is_file():
        raise AssetError(f"scikit-image does not ship {name} at {path}")
    return path


class BundledDemo(Converter):
    """Real scans + reports from installed packages (``--src`` is ignored; pass ``auto``).

    Options:
        num_reports: how many IU normal chest reports to pair with the chest CR (default 16).
    """

    name: ClassVar[str] = "bundled_demo"
    prompt_name: ClassVar[str] = "generic"

    def __init__(
        self, src: str = "auto", views: str = "single", num_reports: int = 16, **options: Any
    ) -> None:
        super().__init__(src, views, **options)  # type: ignore[arg-type]
        self.num_reports = int(num_reports)

    def check_layout(self) -> None:
        try:
            dicom_file(CHEST_DICOM)
            _skimage_file("retina.jpg")
        except AssetError as exc:
            raise LayoutError(f"bundled demo data unavailable: {exc}") from exc

    def iter_cases(self) -> Iterator[Case | Reject]:
        # the file's own VOI window spans the whole 15-bit range (washed out); robust percentiles show the lungs
        chest = ImageRef(str(dicom_file(CHEST_DICOM)), kind="dicom", options={"window": "percentile"})
        try:
            reports = iu_reports(self.num_reports)
        except AssetError as exc:
            yield Reject(self.name, "iu-reports", str(exc))
            reports = []
        for rep in reports:
            text = {
                "caption": f"PA chest radiograph. Findings: {rep['findings']} Impression: {rep['impression']}",
                "findings": rep["findings"],
                "impression": rep["impression"],
                "indication": rep.get("indication", ""),
            }
            labels = {"modality": "CR", "body_part": "chest", "report_id": rep["id"]}
            yield Case(self.name, f"chest-{rep['id']}", [chest], labels=labels, text=text)
        for fname, preset, description in DICOM_CASES:
            try:
                path = dicom_file(fname)
            except AssetError as exc:
                yield Reject(self.name, fname, str(exc))
                continue
            options = {"window": preset} if preset else {}
            labels = _dicom_labels(path)
            yield Case(
                self.name,
                Path(fname).stem,
                [ImageRef(str(path), kind="dicom", options=options)],
                labels=labels,
                text={"caption": description},
            )
        for fname, description, labels in SKIMAGE_CASES:
            try:
                path = _skimage_file(fname)
            except AssetError as exc:
                yield Reject(self.name, fname, str(exc))
                continue
            yield Case(
                self.name,
                Path(fname).stem,
                [ImageRef(str(path))],
                labels=dict(labels),
                text={"caption": description},
            )

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        qa = []
        modality = case.labels.get("modality")
        if modality:
            qa.append(("What imaging modality was used?", MODALITY_NAMES.get(str(modality), str(modality))))
        if case.labels.get("body_part"):
            qa.append(("Which part of the body is shown?", str(case.labels["body_part"]).lower()))
        if "findings" in case.text:
            qa.append(("Describe the findings of this chest X-ray.", case.text["findings"]))
            qa.append(("What is the impression?", case.text["impression"]))
        else:
            qa.append(("Describe this image.", case.text["caption"]))
        return qa


def _dicom_labels(path: Path) -> dict[str, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    body = ds.get("BodyPartExamined") or ""
    return {"modality": str(ds.get("Modality", "")), "body_part": str(body)}


def register(registries: Any) -> None:
    registries.datasets.register_module(name=BundledDemo.name, module=BundledDemo)
