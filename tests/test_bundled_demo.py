"""The bundled demo source: real scans and reports located in installed packages, nothing committed."""

from __future__ import annotations

from pathlib import Path

import pydicom
from cambrian_plugins.datasets.bundled_demo import CHEST_DICOM, iu_reports

from cambrian_core import DATASETS, build
from cambrian_core.data.case import Case, Reject


def test_iu_reports_are_real_normal_reports() -> None:
    reports = iu_reports(limit=5)
    assert len(reports) == 5
    assert [r["id"] for r in reports] == sorted((r["id"] for r in reports), key=int)
    for r in reports:
        assert r["findings"] and r["impression"] and "XXXX" not in r["findings"]


def test_cases_cover_every_modality_with_real_files() -> None:
    conv = build(DATASETS, {"type": "bundled_demo", "src": "auto", "num_reports": 4})
    conv.check_layout()
    items = list(conv.iter_cases())
    assert not [i for i in items if isinstance(i, Reject)]
    cases = [i for i in items if isinstance(i, Case)]
    assert len(cases) == 4 + 7 + 3
    chest = [c for c in cases if c.case_id.startswith("chest-")]
    assert len(chest) == 4 and all(Path(c.images[0].path).name == CHEST_DICOM for c in chest)
    ds = pydicom.dcmread(chest[0].images[0].path, stop_before_pixels=True)
    assert (ds.Modality, ds.BodyPartExamined) == ("CR", "CHEST")
    mods = {c.labels["modality"] for c in cases}
    assert {"CR", "CT", "MR", "US", "NM", "fundus photography", "histopathology"} <= mods
    qa = dict(conv.offline_qa(chest[0]))
    assert qa["What imaging modality was used?"] == "computed radiography (X-ray)"
    assert qa["Describe the findings of this chest X-ray."] == chest[0].text["findings"]
    ct = next(c for c in cases if c.case_id == "693_UNCR")
    assert ct.images[0].options == {"window": "brain"}
