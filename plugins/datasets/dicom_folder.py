"""``dicom``: any folder of DICOM files (a PACS export, a study CD, pydicom's test scans).

One case per image file (``--views single``) or per study, all its images in one sample (``--views multi``,
grouped by Study Instance UID, at most ``max_views`` images). Captions come from the header (modality, body
part, study and series descriptions); the ``template`` generator adds modality / body-part QA from the header.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError

log = logging.getLogger(__name__)

_MODALITY = {
    "CT": "CT",
    "MR": "MR image",
    "CR": "radiograph",
    "DX": "radiograph",
    "MG": "mammogram",
    "US": "ultrasound image",
    "NM": "nuclear medicine image",
    "PT": "PET image",
    "XA": "angiogram",
}
_SKIP_SUFFIXES = {".txt", ".md", ".json", ".csv", ".xml", ".html", ".jpg", ".png", ".zip", ".py"}


class DicomFolder(Converter):
    """Every DICOM image under ``src`` (recursively).

    Options:
        max_views: most images in one multi-view sample (default 4).
    """

    name: ClassVar[str] = "dicom"
    prompt_name: ClassVar[str] = "generic"

    def __init__(
        self, src: str, views: Literal["single", "multi"] = "single", max_views: int = 4, **options: Any
    ) -> None:
        super().__init__(src, views, **options)
        self.max_views = int(max_views)

    def _files(self) -> list[Path]:
        root = Path(self.src)
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in _SKIP_SUFFIXES)

    def check_layout(self) -> None:
        root = Path(self.src)
        if not root.is_dir():
            raise LayoutError(
                f"dicom: --src {root} is not a folder; expected a folder of DICOM files (*.dcm)"
            )
        if not self._files():
            raise LayoutError(f"dicom: no files under {root}; expected DICOM files (*.dcm), any folder depth")

    def _headers(self) -> Iterator[tuple[Path, Any | None, str | None]]:
        import pydicom

        for path in self._files():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # not DICOM, truncated header
                yield path, None, f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})"
                continue
            if "Rows" not in ds:
                yield (
                    path,
                    None,
                    f"{path}: no image (Modality {ds.get('Modality', '?')}): not an image object",
                )
                continue
            yield path, ds, None

    def iter_cases(self) -> Iterator[Case | Reject]:
        root = Path(self.src)
        studies: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
        for path, ds, problem in self._headers():
            rel = _case_name(path.relative_to(root))
            if problem:
                yield Reject(self.name, rel, problem)
            elif self.views == "single":
                yield self._case(rel, [(path, ds)])
            else:
                studies[str(ds.get("StudyInstanceUID") or rel)].append((path, ds))
        for uid, members in studies.items():
            yield self._case(uid, members[: self.max_views])

    def _case(self, case_id: str, members: list[tuple[Path, Any]]) -> Case:
        ds = members[0][1]
        labels = {
            "modality": str(ds.get("Modality") or ""),
            "body_part": str(ds.get("BodyPartExamined") or ""),
        }
        text = {
            k: str(ds.get(key)).strip()
            for k, key in (("study", "StudyDescription"), ("series", "SeriesDescription"))
            if str(ds.get(key) or "").strip()
        }
        images = [
            ImageRef(
                str(p),
                kind="dicom",
                options=self.image_options(),
                view=str(d.get("SeriesDescription") or "") or None,
            )
            for p, d in members
        ]
        return Case(self.name, case_id, images, labels=labels, text=text)

    def caption(self, case: Case) -> str | None:
        kind = _MODALITY.get(case.labels.get("modality", ""), "medical image")
        part = case.labels.get("body_part", "").replace("_", " ").lower()
        head = f"{kind[0].upper()}{kind[1:]}" + (f" of the {part}" if part else "")
        details = [case.text[k] for k in ("study", "series") if case.text.get(k)]
        return f"{head}: {'; '.join(details)}." if details else f"{head}."

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        if case.text.get("study"):
            return [("What examination does this image come from?", case.text["study"])]
        return []


def register(registries: Any) -> None:
    registries.datasets.register_module(name=DicomFolder.name, module=DicomFolder)


#: extensions DICOM files carry; anything else after a dot is part of the name (SOP Instance UIDs: 1.2.840...)
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dc3")


def _case_name(rel: Path) -> str:
    """A file's case id: its path below the source folder without a DICOM extension."""
    return (rel.with_suffix("") if rel.suffix.lower() in _DICOM_SUFFIXES else rel).as_posix()
