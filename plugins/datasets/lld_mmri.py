"""``lld_mmri``: LLD-MMRI 2023 multi-phase liver MRI with focal liver lesion classes.

Layout (source_layouts.md §5)::

    images/<case>/<studyUID>/<seriesUID>.nii[.gz]    8 series per case, one per phase
    labels/Annotation.json                           {"Annotation_info": {<case>: [per-series objects]}}
    classification_dataset/labels/labels.txt         optional: "<case> <class>" per line

One case per lesion and phase (``--views single``) or per lesion with every phase as one multi-image sample
(``--views multi``, phases in acquisition order). Each image is the axial slice through the lesion centre of
that phase's box (``3D_box``, else the largest ``2D_box``), given in the file's own voxel indices (the
SimpleITK ``z, y, x`` array = nibabel ``k, j, i``) and mapped through the canonical reorientation. MR signal
is normalised per volume.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError

#: phase name in Annotation.json -> description, in acquisition order
PHASES = {
    "T2WI": "T2-weighted",
    "DWI": "diffusion-weighted",
    "In Phase": "T1-weighted in-phase",
    "Out Phase": "T1-weighted opposed-phase",
    "C-pre": "pre-contrast T1-weighted",
    "C+A": "arterial phase",
    "C+V": "portal venous phase",
    "C+Delay": "delayed phase",
}
CLASSES = {
    0: "hepatic haemangioma",
    1: "intrahepatic cholangiocarcinoma",
    2: "hepatic abscess",
    3: "hepatic metastasis",
    4: "hepatic cyst",
    5: "focal nodular hyperplasia",
    6: "hepatocellular carcinoma",
}
BENIGN = {0, 2, 4, 5}


def _centre(box3d: dict | None, boxes2d: list | None) -> tuple[float, float, float] | None:
    """Lesion centre (i, j, k) in file voxels from the 3-D box, else the largest 2-D box."""
    if box3d and all(k in box3d for k in ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max")):
        return (
            (box3d["x_min"] + box3d["x_max"]) / 2,
            (box3d["y_min"] + box3d["y_max"]) / 2,
            (box3d["z_min"] + box3d["z_max"]) / 2,
        )
    boxes = [b for b in boxes2d or [] if "slice_idx" in b]
    if not boxes:
        return None
    b = max(boxes, key=lambda b: b.get("area") or (b["x_max"] - b["x_min"]) * (b["y_max"] - b["y_min"]))
    return ((b["x_min"] + b["x_max"]) / 2, (b["y_min"] + b["y_max"]) / 2, float(b["slice_idx"]))


def _size_mm(box3d: dict | None, boxes2d: list | None, spacing: list | None) -> list[float] | None:
    box = box3d or (max(boxes2d, key=lambda b: b.get("area", 0)) if boxes2d else None)
    if not box or not spacing or len(spacing) < 2:
        return None
    try:
        return [
            round((box["x_max"] - box["x_min"]) * spacing[0], 1),
            round((box["y_max"] - box["y_min"]) * spacing[1], 1),
        ]
    except (KeyError, TypeError):
        return None


class LLDMMRI(Converter):
    """LLD-MMRI (see the module docstring)."""

    name: ClassVar[str] = "lld_mmri"
    prompt_name: ClassVar[str] = "lld_mmri"
    license: ClassVar[str | None] = (
        "CC BY-NC 4.0 + LLD-MMRI data agreement (non-commercial, no redistribution)"
    )

    def __init__(self, src: str, views: Literal["single", "multi"] = "single", **options: Any) -> None:
        super().__init__(src, views, **options)
        self.root = Path(src)

    def _layout(self) -> str:
        return (
            f"expected {self.root}/labels/Annotation.json and {self.root}/images/<case>/<studyUID>/<seriesUID>.nii.gz "
            "(optional classification_dataset/labels/labels.txt)"
        )

    def check_layout(self) -> None:
        if not self.root.is_dir():
            raise LayoutError(f"lld_mmri: --src {self.root} is not a folder; {self._layout()}")
        if not (self.root / "images").is_dir():
            raise LayoutError(f"lld_mmri: {self.root / 'images'} not found; {self._layout()}")
        info = self._annotations()
        if not isinstance(info, dict):
            raise LayoutError(f"lld_mmri: Annotation.json has no 'Annotation_info' object; {self._layout()}")

    def _annotations(self) -> dict | None:
        path = self.root / "labels" / "Annotation.json"
        if not path.is_file():
            raise LayoutError(f"lld_mmri: {path} not found; {self._layout()}")
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LayoutError(f"lld_mmri: {path} is not valid JSON ({exc}); {self._layout()}") from exc
        return data.get("Annotation_info") if isinstance(data, dict) else None

    def _class_file(self) -> dict[str, int]:
        path = self.root / "classification_dataset" / "labels" / "labels.txt"
        if not path.is_file():
            return {}
        out = {}
        for line in path.read_text(encoding="utf-8-sig").splitlines():  # CRLF in one public copy
            parts = line.split()
            if len(parts) >= 2 and parts[1].lstrip("-").isdigit():
                out[parts[0]] = int(parts[1])
        return out

    def _series_path(self, case: str, study: str, series: str) -> Path | None:
        for suffix in (".nii.gz", ".nii"):
            path = self.root / "images" / case / study / f"{series}{suffix}"
            if path.is_file():
                return path
        return None

    def iter_cases(self) -> Iterator[Case | Reject]:
        classes = self._class_file()
        order = list(PHASES)
        for case, series_list in (self._annotations() or {}).items():
            if not isinstance(series_list, list):
                yield Reject(self.name, case, f"Annotation.json: {case} is not a list of series")
                continue
            lesions: dict[str, list[dict]] = {}
            category: dict[str, int] = {}
            problems = []
            for item in series_list:
                phase = item.get("phase")
                path = self._series_path(case, str(item.get("studyUID")), str(item.get("seriesUID")))
                if path is None:
                    rel = f"images/{case}/{item.get('studyUID')}/{item.get('seriesUID')}.nii[.gz]"
                    problems.append(f"phase {phase}: {rel} not found")
                    yield Reject(self.name, f"{case}/{phase}", f"{case} phase {phase}: {rel} not found")
                    continue
                for lid, lesion in ((item.get("annotation") or {}).get("lesion") or {}).items():
                    bbox = lesion.get("bbox") or {}
                    centre = _centre(bbox.get("3D_box"), bbox.get("2D_box"))
                    if centre is None:
                        problems.append(f"phase {phase} lesion {lid}: no box")
                        reason = f"{case} phase {phase} lesion {lid}: Annotation.json has no 3D_box or 2D_box"
                        yield Reject(self.name, f"{case}/lesion{lid}/{phase}", reason)
                        continue
                    if lesion.get("category") is not None:
                        category[lid] = int(lesion["category"])
                    lesions.setdefault(str(lid), []).append(
                        {
                            "phase": phase,
                            "path": str(path),
                            "centre": centre,
                            "size_mm": _size_mm(
                                bbox.get("3D_box"), bbox.get("2D_box"), item.get("pixel_spacing")
                            ),
                        }
                    )
            if not lesions:
                if not problems:
                    yield Reject(self.name, case, f"{case}: Annotation.json annotates no lesion")
                continue
            for lid, entries in lesions.items():
                entries.sort(key=lambda e: order.index(e["phase"]) if e["phase"] in order else len(order))
                cls = category.get(lid, classes.get(case, -1))
                if self.views == "multi":
                    yield self._case(f"{case}/lesion{lid}", entries, cls, case, problems)
                else:
                    for e in entries:
                        yield self._case(f"{case}/lesion{lid}/{e['phase']}", [e], cls, case, problems)

    def _case(self, case_id: str, entries: list[dict], cls: int, patient: str, problems: list[str]) -> Case:
        refs = [
            ImageRef(
                e["path"],
                kind="nifti",
                options=self.image_options(slice_axis="axial", voxel=e["centre"]),
                view=PHASES.get(e["phase"], str(e["phase"])),
            )
            for e in entries
        ]
        labels = {
            "modality": "MR",
            "body_part": "liver",
            "patient": patient,
            "phases": [e["phase"] for e in entries],
            "class": cls if cls in CLASSES else None,
            "diagnosis": CLASSES.get(cls),
            "malignant": None if cls not in CLASSES else cls not in BENIGN,
            "size_mm": next((e["size_mm"] for e in entries if e["size_mm"]), None),
            "missing_phases": problems,
        }
        return Case(self.name, case_id, refs, labels=labels)

    # ------------------------------------------------------------------------------------------- text

    @staticmethod
    def _lesion_phrase(case: Case) -> str:
        size = case.labels.get("size_mm")
        dx = case.labels.get("diagnosis")
        size_txt = f"{size[0]:.0f} x {size[1]:.0f} mm " if size else ""
        if dx:
            nature = "malignant" if case.labels["malignant"] else "benign"
            return f"a {size_txt}{dx} ({nature})"
        return f"a {size_txt}focal liver lesion"

    def caption(self, case: Case) -> str | None:
        views = [ref.view for ref in case.images]
        if len(views) == 1:
            return f"Axial {views[0]} MR image of the liver showing {self._lesion_phrase(case)}."
        return f"Multi-phase liver MRI ({', '.join(views)}) showing {self._lesion_phrase(case)}."

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        qa = []
        if len(case.images) == 1:
            view = case.images[0].view or ""
            qa.append(("Which MRI sequence or phase is this image?", f"{view[:1].upper()}{view[1:]}."))
        if case.labels.get("diagnosis"):
            dx = case.labels["diagnosis"]
            qa.append(
                ("What is the most likely diagnosis of the focal liver lesion?", f"{dx[:1].upper()}{dx[1:]}.")
            )
            qa.append(
                (
                    "Is the liver lesion benign or malignant?",
                    "Malignant." if case.labels["malignant"] else "Benign.",
                )
            )
        size = case.labels.get("size_mm")
        if size:
            qa.append(
                ("How large is the liver lesion in this plane?", f"About {size[0]:.0f} x {size[1]:.0f} mm.")
            )
        return qa


def register(registries: Any) -> None:
    registries.datasets.register_module(name=LLDMMRI.name, module=LLDMMRI)
