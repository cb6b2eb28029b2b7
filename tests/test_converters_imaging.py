"""PadChest, DeepLesion, LLD-MMRI and MAMA-MIA converters on small trees in their real release layouts.

The trees are built here from real files that packages ship: the PadChest CSV inside the torchxrayvision wheel
(read as a data file), pydicom-data's chest CR and CT scans, nibabel's NIfTI test volumes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut

from cambrian_core import DATASETS, GENERATORS, build
from cambrian_core.assets import dicom_file, wheel_member, xrv_wheel
from cambrian_core.cli import main
from cambrian_core.data.case import Reject
from cambrian_core.data.converter import LayoutError
from cambrian_core.data.medimage import load_image
from cambrian_core.data.output_store import RunConflictError
from cambrian_core.data.runner import convert

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
IMAGING = ("padchest", "deeplesion", "lld_mmri", "mama_mia")


def _run(source: str, src: Path, out: Path, **kw):
    views = kw.pop("views", "single")
    conv = build(DATASETS, {"type": source, "src": str(src), "views": views, **kw})
    summary = convert(conv, build(GENERATORS, {"type": "template"}), out, progress=False)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    rejects = {r["case_id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    return summary, records, rejects


def _by_case(records: list[dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        out.setdefault(r["provenance"]["source_id"], {})[r["stage"]] = r
    return out


def _qa(record: dict) -> dict[str, str]:
    conv = record["conversations"]
    return {conv[i]["value"].split("\n")[-1]: conv[i + 1]["value"] for i in range(0, len(conv), 2)}


@pytest.mark.parametrize("source", IMAGING)
def test_missing_folder_names_the_expected_layout(source, tmp_path):
    conv = build(DATASETS, {"type": source, "src": str(tmp_path / "missing")})
    with pytest.raises(LayoutError, match=rf"{source}: --src .*missing is not a folder; expected "):
        conv.check_layout()
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="expected"):
        build(DATASETS, {"type": source, "src": str(tmp_path / "empty")}).check_layout()


# ------------------------------------------------------------------------------------------------ PadChest


@pytest.fixture(scope="module")
def padchest_rows():
    """Header and rows of the real PadChest CSV (torchxrayvision 1.5.7 wheel, read as a data file)."""
    data = gzip.decompress(wheel_member(xrv_wheel(), PADCHEST_CSV + ".gz")).decode("utf-8")
    reader = csv.reader(io.StringIO(data))
    header = next(reader)
    return header, list(reader)


def _chest_png16(path: Path, shift: int = 0) -> np.ndarray:
    """pydicom-data's real PA chest CR as a PadChest-style 16-bit PNG (MONOCHROME2, 12-bit values)."""
    ds = pydicom.dcmread(dicom_file("RG1_UNCR.dcm"))
    arr = ds.pixel_array[::8, ::8].astype(np.float64)
    arr = arr.max() - arr  # MONOCHROME1 -> MONOCHROME2, as PadChest stores it
    arr = (arr - arr.min()) / (arr.max() - arr.min()) * 4000 + 50 + shift
    out = np.roll(arr.astype(np.uint16), shift, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out).save(path)
    return out


@pytest.fixture(scope="module")
def padchest_tree(padchest_rows, tmp_path_factory):
    header, rows = padchest_rows
    col = {name: i for i, name in enumerate(header)}
    by_study: dict[str, list[list[str]]] = {}
    for r in rows[10:5000]:  # away from rows 0-3, used below
        by_study.setdefault(r[col["StudyID"]], []).append(r)
    pa_l = next(v for v in by_study.values() if sorted(r[col["Projection"]] for r in v) == ["L", "PA"])
    pick = {
        "normal": rows[0],
        "lateral": rows[1],
        "nan_labels": next(r for r in rows if r[col["Labels"]] == "nan"),
        "exclude": next(r for r in rows if r[col["Projection"]] == "EXCLUDE"),
        "missing": rows[2],
        "corrupt": rows[3],
        "pa": next(r for r in pa_l if r[col["Projection"]] == "PA"),
        "l": next(r for r in pa_l if r[col["Projection"]] == "L"),
    }
    src = tmp_path_factory.mktemp("padchest")
    with open(src / PADCHEST_CSV, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(pick.values())
    files = {}
    for i, (key, r) in enumerate(pick.items()):
        if key in ("missing", "exclude"):
            continue
        image_id, image_dir = r[col["ImageID"]], r[col["ImageDir"]]
        # the release's <ImageDir>/<ImageID> layout, and one image flat in src (both occur in the wild)
        path = src / image_id if key == "lateral" else src / image_dir / image_id
        files[key] = _chest_png16(path, shift=i * 3)
        if key == "corrupt":
            path.write_bytes(path.read_bytes()[:300])
    return src, pick, col, files


def test_padchest_single_view(padchest_tree, tmp_path):
    src, pick, col, files = padchest_tree
    summary, records, rejects = _run("padchest", src, tmp_path / "out")
    stem = lambda key: pick[key][col["ImageID"]].removesuffix(".png")  # noqa: E731
    assert rejects[stem("missing")]["reason"].endswith(f"image not found under {src}")
    assert "Projection is EXCLUDE" in rejects[stem("exclude")]["reason"]
    assert rejects[stem("corrupt")]["kind"] == "image" and "truncated" in rejects[stem("corrupt")]["reason"]
    assert summary.converted == 5
    cases = _by_case(records)
    normal = cases[stem("normal")]
    # row 0 of the real CSV: PA, female, born 1930, study 2014, Labels ['normal']
    assert normal["caption"]["conversations"][1]["value"] == (
        "Posteroanterior (PA) chest X-ray of a 84-year-old female. No abnormality is reported (normal study)."
    )
    assert _qa(normal["instruct"])["Is this chest X-ray normal?"] == "Yes. No abnormality is reported."
    lateral = _qa(cases[stem("lateral")]["instruct"])
    assert lateral["Which projection is this chest X-ray?"] == "It is a lateral view."
    assert lateral["What are the findings?"].startswith("Pulmonary fibrosis, chronic changes, kyphosis")
    assert lateral["Where are the findings located?"] == "basal and basal bilateral."
    assert "caption" not in cases[stem("nan_labels")]  # Labels is nan: no caption, only the view question
    assert normal["caption"]["provenance"]["license"].startswith("CC BY-SA 4.0")
    # the PNG is the 16-bit film rescaled over its own range, 8-bit RGB
    png = np.asarray(Image.open(tmp_path / "out" / normal["caption"]["image"]))
    src16 = files["normal"].astype(np.float64)
    expected = np.clip(np.rint((src16 - src16.min()) * 255 / (src16.max() - src16.min())), 0, 255)
    assert png.shape == (*src16.shape, 3) and np.abs(png[..., 0] - expected).max() <= 1


def test_padchest_suboptimal_study_is_image_quality_not_a_finding(padchest_tree):
    src, pick, col, _ = padchest_tree
    header = list(col)
    conv = build(DATASETS, {"type": "padchest", "src": str(src)})

    def case_with(labels: str):
        row = dict(zip(header, pick["normal"], strict=True))
        fields = conv._row({**row, "Labels": labels, "Localizations": "[]"})
        return conv._case(fields["stem"], [fields])

    alone = case_with("['suboptimal study']")  # 387 rows of the real CSV say only this
    assert alone.labels["findings"] == [] and alone.labels["suboptimal_study"] is True
    assert conv.caption(alone).endswith(
        "No finding labels are recorded. The study is technically suboptimal."
    )
    qa = dict(conv.offline_qa(alone))
    assert "Is this chest X-ray normal?" not in qa
    assert qa["Is the image quality of this study optimal?"] == "No. It is a suboptimal study."
    with_finding = case_with("['hypoexpansion', ' suboptimal study']")
    assert dict(conv.offline_qa(with_finding))["Is this chest X-ray normal?"] == "No. It shows hypoexpansion."
    normal = case_with("['normal', 'suboptimal study']")
    assert dict(conv.offline_qa(normal))["Is this chest X-ray normal?"] == "Yes. No abnormality is reported."
    plain = case_with("['normal']")
    assert plain.labels["suboptimal_study"] is False
    assert "Is the image quality of this study optimal?" not in dict(conv.offline_qa(plain))


def test_padchest_multi_view_study(padchest_tree, tmp_path):
    src, pick, col, _ = padchest_tree
    _, records, _ = _run("padchest", src, tmp_path / "out", views="multi")
    study = pick["pa"][col["StudyID"]]
    rec = _by_case(records)[study]["instruct"]
    assert isinstance(rec["image"], list) and len(rec["image"]) == 2
    first = rec["conversations"][0]["value"]
    assert first.startswith("<image>\n<image>\nThe images are, in order: PA, lateral.\n")
    assert _qa(rec)["Which views of the chest are shown?"] == "Posteroanterior (PA) and lateral views."


@pytest.mark.slow
def test_padchest_whole_real_csv_parses(padchest_rows, tmp_path):
    (tmp_path / (PADCHEST_CSV + ".gz")).write_bytes(wheel_member(xrv_wheel(), PADCHEST_CSV + ".gz"))
    conv = build(DATASETS, {"type": "padchest", "src": str(tmp_path)})
    conv.check_layout()
    items = list(conv.iter_cases())
    assert len(items) == len(padchest_rows[1]) == 160861
    reasons = [i.reason for i in items if isinstance(i, Reject)]
    assert sum("Projection is EXCLUDE" in r for r in reasons) == 11
    assert all("image not found" in r or "EXCLUDE" in r for r in reasons)  # every Labels cell parsed


# ------------------------------------------------------------------------------------------------ DeepLesion

DL_HEADER = (
    "File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,Bounding_boxes,"
    "Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range,"
    "Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test"
)


def _dl_row(name, key, box, diam, kind, noisy=0, rng="107, 111", window="-175, 275"):
    p, s, se = name.split("_")[:3]
    return [name, int(p), int(s), int(se), key, "1, 2, 3, 4, 5, 6, 7, 8", box, diam, "0.44, 0.41, 0.55", kind,
            noisy, rng, "0.7, 0.7, 5", "128, 128", window, "F", 62, 2]  # fmt: skip


def _hu_png(path: Path, hu: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((hu.astype(np.int32) + 32768).astype(np.uint16)).save(path)


@pytest.fixture(scope="module")
def deeplesion_tree(tmp_path_factory):
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))  # real CT, 128 x 128
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.int32)
    src = tmp_path_factory.mktemp("deeplesion")
    for k in (108, 109, 110):
        _hu_png(src / "Images_png" / "000001_01_01" / f"{k:03d}.png", hu + (k - 109))
    _hu_png(src / "Images_png" / "000002_01_01" / "050.png", hu)
    rows = [
        _dl_row("000001_01_01_109.png", 109, "40.0, 30.0, 80.0, 60.0", "50.0, 30.0", 4),
        _dl_row("000001_01_01_109.png", 109, "10.0, 10.0, 20.0, 30.0", "20.0, 10.0", -1),
        _dl_row("000002_01_01_050.png", 50, "1, 2, 3, 4", "5.0, 4.0", 5, noisy=1),
        _dl_row("000003_01_01_020.png", 20, "1, 2, 3, 4", "5.0, 4.0", 5),
        _dl_row("000004_01_01_020.png", 20, "1, 2, 3", "5.0, 4.0", 5),
    ]
    with open(src / "DL_info.csv", "w", newline="") as f:
        f.write(DL_HEADER + "\n")
        csv.writer(f).writerows(rows)
    return src, hu


def test_deeplesion_key_slices(deeplesion_tree, tmp_path):
    src, hu = deeplesion_tree
    summary, records, rejects = _run("deeplesion", src, tmp_path / "out")
    assert summary.converted == 1
    assert rejects["000002_01_01_050"]["reason"].endswith("every lesion is flagged Possibly_noisy")
    assert "key slice 20 not found in Images_png/ or Key_slices/" in rejects["000003_01_01_020"]["reason"]
    assert "column Bounding_boxes: expected 4 numbers, got 3" in rejects["000004_01_01_020"]["reason"]
    case = _by_case(records)["000001_01_01_109"]
    assert case["caption"]["conversations"][1]["value"] == (
        "Axial CT slice of a 62-year-old female (window -175 to 275 HU) with 2 annotated lesions: "
        "a 35.0 x 21.0 mm liver lesion and a 14.0 x 7.0 mm lesion (type not labelled)."
    )
    qa = _qa(case["instruct"])
    assert qa["How many lesions are annotated on this CT slice?"] == "2."
    assert "Which organ or region do the lesions involve?" not in qa  # one lesion is unlabelled
    assert qa["Where is the lesion in the image? Give its bounding box as fractions of the width and height "
              "(x1, y1, x2, y2)."] == "Lesion 1: [0.31, 0.23, 0.62, 0.47]; Lesion 2: [0.08, 0.08, 0.16, 0.23]."  # fmt: skip
    # the key slice is windowed with DICOM_windows (-175..275 HU): centre 50, width 450
    png = np.asarray(Image.open(tmp_path / "out" / case["caption"]["image"]))[..., 0]
    expected = np.clip(np.rint((hu - (-175)) * 255 / 450), 0, 255)
    assert np.abs(png - expected).max() <= 1


def test_a_csv_saved_with_a_byte_order_mark_reads_the_same(deeplesion_tree, tmp_path):
    import shutil

    src, _ = deeplesion_tree
    bom = tmp_path / "bom"
    shutil.copytree(src, bom)
    table = (src / "DL_info.csv").read_text(encoding="utf-8")
    (bom / "DL_info.csv").write_text(table, encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    assert (bom / "DL_info.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    plain = _run("deeplesion", src, tmp_path / "plain")
    marked = _run("deeplesion", bom, tmp_path / "marked")
    assert marked[0].converted == plain[0].converted == 1
    assert sorted(marked[2]) == sorted(plain[2])


def test_deeplesion_neighbours_and_key_slices_folder(deeplesion_tree, tmp_path):
    src, hu = deeplesion_tree
    _, records, _ = _run("deeplesion", src, tmp_path / "multi", views="multi", neighbors=2)
    rec = _by_case(records)["000001_01_01_109"]["caption"]
    assert len(rec["image"]) == 3  # 107 and 111 are in Slice_range but not shipped
    assert (
        "The images are, in order: slice -5 mm, key slice, slice +5 mm." in rec["conversations"][0]["value"]
    )
    # MVD's variant: Key_slices/<File_name> only
    alt = tmp_path / "alt"
    (alt / "Key_slices").mkdir(parents=True)
    (alt / "DL_info.csv").write_bytes((src / "DL_info.csv").read_bytes())
    _hu_png(alt / "Key_slices" / "000001_01_01_109.png", hu)
    summary, records, _ = _run("deeplesion", alt, tmp_path / "alt_out")
    assert summary.converted == 1 and _by_case(records)["000001_01_01_109"]["caption"]


def test_other_converter_settings_in_the_same_out_are_a_conflict_not_a_resume(deeplesion_tree, tmp_path):
    import shutil

    src, _ = deeplesion_tree
    out = tmp_path / "out"
    first = _run("deeplesion", src, out)[0]  # drop_noisy=True: 000002 is rejected, and done
    assert _run("deeplesion", src, out)[0].skipped["already_done"] == first.total_done == 4  # same: resumes
    with pytest.raises(
        RunConflictError, match=r"other settings \(arguments\.drop_noisy: True there, False now\)"
    ):
        _run("deeplesion", src, out, drop_noisy=False)
    with pytest.raises(RunConflictError, match=r"\(arguments\.neighbors: 1 there, 2 now\)"):
        _run("deeplesion", src, out, neighbors=2)
    shutil.copytree(src, tmp_path / "copy")
    moved = re.escape(f"arguments.src: {src.resolve()} there, {(tmp_path / 'copy').resolve()} now")
    with pytest.raises(RunConflictError, match=moved):
        _run("deeplesion", tmp_path / "copy", out)
    recorded = {"drop_noisy": "True", "neighbors": "1", "src": str(src.resolve())}
    info = json.loads((out / "run.json").read_text())
    assert info["arguments"] == recorded
    del info["arguments"]  # a folder written before the arguments were recorded still resumes
    (out / "run.json").write_text(json.dumps(info))
    assert _run("deeplesion", src, out)[0].skipped["already_done"] == 4
    assert json.loads((out / "run.json").read_text())["arguments"] == recorded


def test_deeplesion_bad_header(tmp_path):
    (tmp_path / "Images_png").mkdir()
    (tmp_path / "DL_info.csv").write_text("File_name,Key_slice_index\n")
    with pytest.raises(LayoutError, match=r"DL_info.csv lacks the column\(s\) Patient_index, Study_index"):
        build(DATASETS, {"type": "deeplesion", "src": str(tmp_path)}).check_layout()


# ------------------------------------------------------------------------------------------------ LLD-MMRI


def _volume(name: str, phase: int = 0) -> nib.Nifti1Image:
    img = nib.load(NIB_DATA / name)
    data = np.asarray(img.dataobj)
    return nib.Nifti1Image(data[..., phase] if data.ndim == 4 else data, img.affine)


@pytest.fixture(scope="module")
def lld_tree(tmp_path_factory):
    src = tmp_path_factory.mktemp("lld")
    series = {"C-pre": ("s-pre", 0), "C+A": ("s-art", 1), "T2WI": ("s-t2", 0), "DWI": ("s-dwi", 1)}
    entries = []
    for phase, (uid, vol) in series.items():
        if phase != "DWI":  # the DWI series file is missing from this copy
            path = src / "images" / "MR100001" / "1.2.3" / f"{uid}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(_volume("example4d.nii.gz", vol), path)
        box = {"x_min": 50, "x_max": 70, "y_min": 30, "y_max": 50, "z_min": 9, "z_max": 11}
        entries.append(
            {"studyUID": "1.2.3", "seriesUID": uid, "phase": phase, "pixel_spacing": [2.0, 2.0],
             "annotation": {"num_targets": 1, "lesion": {"0": {"category": 6, "bbox": {"3D_box": box}}}}}
        )  # fmt: skip
    nobox = {
        "studyUID": "9",
        "seriesUID": "t",
        "phase": "C+V",
        "annotation": {"lesion": {"0": {"category": 4}}},
    }
    (src / "images" / "MR100002" / "9").mkdir(parents=True)
    nib.save(_volume("anatomical.nii"), src / "images" / "MR100002" / "9" / "t.nii")  # uncompressed, as MVD
    (src / "labels").mkdir()
    ann = {"Annotation_info": {"MR100001": entries, "MR100002": [nobox]}, "Category_info": {}}
    (src / "labels" / "Annotation.json").write_text(json.dumps(ann))
    return src


def test_lld_single_phase_cases(lld_tree, tmp_path):
    summary, records, rejects = _run("lld_mmri", lld_tree, tmp_path / "out")
    assert summary.converted == 3
    assert (
        "MR100001 phase DWI: images/MR100001/1.2.3/s-dwi.nii[.gz] not found"
        in rejects["MR100001/DWI"]["reason"]
    )
    assert "no 3D_box or 2D_box" in rejects["MR100002/lesion0/C+V"]["reason"]
    cases = _by_case(records)
    art = cases["MR100001/lesion0/C+A"]
    assert art["caption"]["conversations"][1]["value"] == (
        "Axial arterial phase MR image of the liver showing a 40 x 40 mm hepatocellular carcinoma (malignant)."
    )
    qa = _qa(art["instruct"])
    assert qa["Which MRI sequence or phase is this image?"] == "Arterial phase."
    assert qa["Is the liver lesion benign or malignant?"] == "Malignant."
    # the lesion-centred slice: file voxel k = 10 (example4d is LAS, so canonical axis 2 keeps k)
    png = np.asarray(Image.open(tmp_path / "out" / art["caption"]["image"]))
    path = lld_tree / "images" / "MR100001" / "1.2.3" / "s-art.nii.gz"
    assert np.array_equal(png, np.asarray(load_image(path, slice_index=10)))
    assert not np.array_equal(png, np.asarray(load_image(path, slice_index=12)))


def test_lld_multi_phase_sample(lld_tree, tmp_path):
    _, records, _ = _run("lld_mmri", lld_tree, tmp_path / "out", views="multi")
    rec = _by_case(records)["MR100001/lesion0"]["caption"]
    assert len(rec["image"]) == 3
    assert (
        "in order: T2-weighted, pre-contrast T1-weighted, arterial phase." in rec["conversations"][0]["value"]
    )
    assert rec["conversations"][1]["value"].startswith("Multi-phase liver MRI (T2-weighted, pre-contrast")


def test_lld_class_from_the_classification_labels_when_annotation_has_none(tmp_path):
    src = tmp_path / "lld"
    path = src / "images" / "MR200001" / "7" / "s-v.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(_volume("example4d.nii.gz", 0), path)
    box = {"x_min": 50, "x_max": 70, "y_min": 30, "y_max": 50, "z_min": 9, "z_max": 11}
    lesion = {"0": {"bbox": {"3D_box": box}}}  # no category: the class comes from labels.txt
    series = {"studyUID": "7", "seriesUID": "s-v", "phase": "C+V", "annotation": {"lesion": lesion}}
    (src / "labels").mkdir()
    ann = {"Annotation_info": {"MR200001": [series], "MR200002": [{**series, "seriesUID": "gone"}]}}
    (src / "labels" / "Annotation.json").write_text(json.dumps(ann))
    labels = src / "classification_dataset" / "labels" / "labels.txt"
    labels.parent.mkdir(parents=True)
    labels.write_bytes(b"MR200001 2\r\nMR200002 6\r\nmalformed line\r\n")  # CRLF, as in one public copy
    summary, records, _ = _run("lld_mmri", src, tmp_path / "out")
    assert summary.converted == 1
    qa = _qa(_by_case(records)["MR200001/lesion0/C+V"]["instruct"])
    assert qa["Is the liver lesion benign or malignant?"] == "Benign."  # class 2: hepatic abscess
    caption = _by_case(records)["MR200001/lesion0/C+V"]["caption"]["conversations"][1]["value"]
    assert "hepatic abscess" in caption


# ------------------------------------------------------------------------------------------------ MAMA-MIA

MAMA_COLUMNS = [
    "patient_id",
    "dataset",
    "bilateral_breast_cancer",
    "multifocal_cancer",
    "nac_agent",
    "endocrine_therapy",
    "anti_her2_neu_therapy",
    "pcr",
    "mastectomy_post_nac",
    "days_to_follow_up",
    "days_to_recurrence",
    "days_to_metastasis",
    "days_to_death",
    "hr",
    "er",
    "pr",
    "her2",
    "mammaprint",
    "oncotype_score",
    "nottingham_grade",
    "tumor_subtype",
    "age",
    "menopause",
    "ethnicity",
    "has_implant",
    "weight",
    "patient_size",
    "bmi_group",
    "view",
    "bilateral_mri",
    "num_phases",
    "fat_suppressed",
    "field_strength",
    "image_rows",
    "image_columns",
    "num_slices",
    "pixel_spacing",
    "slice_thickness",
    "site",
    "manufacturer",
    "scanner_model",
    "high_bit",
    "window_center",
    "window_width",
    "echo_time",
    "repetition_time",
    "acquisition_times",
    "acquisition_date",
    "tcia_series_uid",
]


@pytest.fixture(scope="module")
def mama_tree(tmp_path_factory):
    import openpyxl

    src = tmp_path_factory.mktemp("mama")
    folder = src / "images" / "DUKE_001"
    folder.mkdir(parents=True)
    for i, vol in enumerate((0, 1, 1)):
        img = _volume("example4d.nii.gz", vol)
        data = np.asarray(img.dataobj).astype(np.float32) * (1 + 0.3 * i)  # contrast uptake
        nib.save(nib.Nifti1Image(data, img.affine), folder / f"duke_001_000{i}.nii.gz")
    (src / "images" / "ISPY1_1001").mkdir()  # no phase files
    mask = np.zeros((128, 96, 24), np.uint8)
    mask[60:70, 40:50, 5:10] = 1  # centroid k = 7
    (src / "segmentations" / "expert").mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask, nib.load(NIB_DATA / "example4d.nii.gz").affine),
             src / "segmentations" / "expert" / "duke_001.nii.gz")  # fmt: skip
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "dataset_info"
    sheet.append(MAMA_COLUMNS)
    values = {"patient_id": "DUKE_001", "dataset": "DUKE", "pcr": 0.0, "er": 1.0, "pr": 1.0, "her2": 0.0,
              "nottingham_grade": "high", "tumor_subtype": "luminal_a", "age": 45.0, "view": "axial",
              "num_phases": 3, "field_strength": 1.5, "manufacturer": "GE"}  # fmt: skip
    sheet.append([values.get(c) for c in MAMA_COLUMNS])
    book.save(src / "clinical_and_imaging_info.xlsx")
    return src


def test_mama_mia_single_phases(mama_tree, tmp_path):
    summary, records, rejects = _run("mama_mia", mama_tree, tmp_path / "out")
    assert summary.converted == 3
    assert "no <patient_id>_000N.nii[.gz] phase files" in rejects["ISPY1_1001"]["reason"]
    cases = _by_case(records)
    post = cases["DUKE_001/0001"]
    assert post["caption"]["conversations"][1]["value"] == (
        "Axial breast DCE-MRI, post-contrast 1 of a 45-year-old patient with luminal A breast cancer "
        "(ER+, PR+, HER2-; Nottingham grade high)."
    )
    qa = _qa(post["instruct"])
    assert qa["Is this a pre-contrast or a post-contrast image?"].startswith("Post-contrast")
    assert qa["What is the hormone receptor and HER2 status?"] == "ER+, PR+, HER2-."
    assert qa["Did the patient achieve a pathologic complete response to neoadjuvant therapy?"] == "No."
    assert (
        _qa(cases["DUKE_001/0000"]["instruct"])["Is this a pre-contrast or a post-contrast image?"]
        == "Pre-contrast."
    )
    # the slice goes through the expert mask's centroid (k = 7), not the middle (k = 12)
    png = np.asarray(Image.open(tmp_path / "out" / post["caption"]["image"]))
    phase = mama_tree / "images" / "DUKE_001" / "duke_001_0001.nii.gz"
    assert np.array_equal(png, np.asarray(load_image(phase, slice_index=7)))
    assert not np.array_equal(png, np.asarray(load_image(phase)))


def test_mama_mia_multi_phase_and_cli(mama_tree, tmp_path, capsys):
    rc = main(["convert", "mama_mia", "--src", str(mama_tree), "--out", str(tmp_path / "o"), "--views", "multi",
               "--no-progress"])  # fmt: skip
    assert rc == 0 and "converted 1 cases into 2 records" in capsys.readouterr().out
    rec = json.loads((tmp_path / "o" / "records.jsonl").read_text().splitlines()[0])
    assert rec["id"] == "mama_mia:DUKE_001:0" and len(rec["image"]) == 3
    assert rec["conversations"][0]["value"].count("<image>") == 3
    assert "pre-contrast, post-contrast 1, post-contrast 2" in rec["conversations"][0]["value"]
    (tmp_path / "bare" / "images" / "DUKE_002").mkdir(parents=True)
    assert main(["convert", "mama_mia", "--src", str(tmp_path / "bare"), "--out", str(tmp_path / "o2")]) == 2
    assert "mama_mia: no clinical table in" in capsys.readouterr().err


def test_mama_mia_one_file_per_phase_when_nii_and_nii_gz_sit_side_by_side(mama_tree, tmp_path):
    import shutil

    src = tmp_path / "mama"
    shutil.copytree(mama_tree, src)
    folder = src / "images" / "DUKE_001"
    for gz in sorted(folder.glob("*.nii.gz")):  # `gunzip -k`, as MultiViewDx unpacks them
        (folder / gz.name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
    (folder / "duke_001_0002.nii.gz").unlink()  # a phase only unpacked is still found
    multi = [c for c in build(DATASETS, {"type": "mama_mia", "src": str(src), "views": "multi"}).iter_cases()
             if not isinstance(c, Reject)]  # fmt: skip
    assert [c.case_id for c in multi] == ["DUKE_001"] and multi[0].labels["phases"] == [0, 1, 2]
    names = [Path(ref.path).name for ref in multi[0].images]
    assert names == ["duke_001_0000.nii.gz", "duke_001_0001.nii.gz", "duke_001_0002.nii"]
    single = [c.case_id for c in build(DATASETS, {"type": "mama_mia", "src": str(src)}).iter_cases()]
    assert single == ["DUKE_001/0000", "DUKE_001/0001", "DUKE_001/0002", "ISPY1_1001"]


def test_every_imaging_converter_is_registered():
    assert set(IMAGING) <= set(DATASETS.names())
    for name in IMAGING:
        conv = build(DATASETS, {"type": name, "src": "x"})
        assert conv.name == name and conv.prompt_name == name and conv.license
        assert isinstance(conv, DATASETS.get(name))
