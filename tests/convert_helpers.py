"""Helpers for the conversion tests: small real-format DICOM trees and test-only generators.

Importable by worker processes (the runner's pool uses spawn, which keeps ``sys.path``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from cambrian_core.data.case import Case
from cambrian_core.data.converter import Converter
from cambrian_core.data.generators.template import TemplateGenerator


def write_ct(path: Path, hu: np.ndarray, body_part: str = "CHEST", study: str = "CT CHEST") -> Path:
    """A CT DICOM (stored = HU + 1024, slope 1, intercept -1024) with descriptive header fields."""
    stored = (np.asarray(hu) + 1024).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.StudyDescription = "CT", body_part, study
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 1
    ds.Rows, ds.Columns = stored.shape
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_tree(root: Path, n: int, size: int = 48, bad: bool = True) -> Path:
    """``n`` CT files with distinct content, plus (``bad``) one corrupt file and one non-image DICOM."""
    rng = np.random.default_rng(0)
    for i in range(n):
        hu = rng.integers(-1000, 1000, (size, size))
        write_ct(root / f"case{i:03d}.dcm", hu, body_part=("CHEST", "ABDOMEN")[i % 2])
    if bad:
        good = (root / "case000.dcm").read_bytes()
        (root / "zz_truncated.dcm").write_bytes(good[: len(good) - 500])
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.88.11", "SR"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(root / "zz_report.dcm", enforce_file_format=True)
    return root


class SlowTemplate(TemplateGenerator):
    """The template generator, ``delay`` seconds slower per case (so a test can kill a run midway)."""

    def __init__(self, delay: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.delay = delay

    def generate(self, converter: Converter, case: Case, images: list[Path]) -> list[dict]:
        time.sleep(self.delay)
        return super().generate(converter, case, images)


class FlakyTemplate(TemplateGenerator):
    """Fails with a (retryable) connection error for the case ids in ``fail``; bad records for ``bad``."""

    def __init__(self, fail: tuple[str, ...] = (), bad: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.fail, self.bad = set(fail), set(bad)

    def generate(self, converter: Converter, case: Case, images: list[Path]) -> list[dict]:
        if case.case_id in self.fail:
            raise ConnectionError(f"API unreachable for {case.case_id}")
        records = super().generate(converter, case, images)
        if case.case_id in self.bad:
            records[0]["conversations"][0]["value"] += "\n<image>"
        return records
