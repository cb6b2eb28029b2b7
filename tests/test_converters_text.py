"""Text-rich converters (pmc_oa, quilt, eurorad, radiopaedia, llava) on small fixture trees in their real layouts."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from cambrian_plugins.datasets.pmc_oa import undo_unicode_escape
from PIL import Image

from cambrian_core.data.case import Case, Reject
from cambrian_core.data.converter import Converter, LayoutError
from cambrian_core.data.records import conversation_problem, iter_records
from cambrian_core.data.sources import clean_text
from cambrian_core.registry import DATASETS, build

LONG_CAPTION = (
    "Axial contrast-enhanced CT of the abdomen shows a large hypodense mass in the right hepatic lobe with "
    "peripheral nodular enhancement, consistent with a hepatic hemangioma in this 45-year-old woman."
)


def jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        path, "JPEG", quality=85
    )
    return path


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(path, "PNG")
    return path


def split(items: list[Case | Reject]) -> tuple[dict[str, Case], dict[str, str]]:
    cases = {c.case_id: c for c in items if isinstance(c, Case)}
    rejects = {r.case_id: r.reason for r in items if isinstance(r, Reject)}
    return cases, rejects


def converter(name: str, src: Path, **kw: object) -> Converter:
    conv = build(DATASETS, {"type": name, "src": str(src), **kw})
    conv.check_layout()
    return conv


@pytest.mark.parametrize("name", ["pmc_oa", "quilt", "eurorad", "radiopaedia", "llava"])
def test_registered_and_layout_errors(name: str, tmp_path: Path) -> None:
    cls = DATASETS.get(name)
    assert cls.name == name and cls.prompt_name in ("pmc_oa", "quilt", "eurorad", "radiopaedia", "generic")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match=name):
        build(DATASETS, {"type": name, "src": str(tmp_path / "empty")}).check_layout()
    with pytest.raises(ValueError, match=r"unknown option\(s\) `windw` \(did you mean `window`\?\)"):
        build(DATASETS, {"type": name, "src": str(tmp_path / "empty"), "windw": "lung"})


# -- PMC-OA ---------------------------------------------------------------------------------------------------------


def test_pmc_oa_release_layout(tmp_path: Path) -> None:
    root = tmp_path / "pmc_oa"
    imgs = root / "caption_T060_filtered_top4_sep_v0_subfigures"
    jpeg(imgs / "PMC212319_Fig3_4.jpg", 1)
    jpeg(imgs / "PMC100_F1_1.jpg", 2)
    jpeg(imgs / "PMC101_F2_1.jpg", 3)
    rows = [
        {
            "image": "PMC212319_Fig3_4.jpg",
            "caption": LONG_CAPTION,
            "alignment_type": "subcap",
            "alignment_score": 0.9,
        },
        # a raw U+2028 inside a JSON string (ensure_ascii=False writers) is not a line break of the file
        {"image": "PMC100_F1_1.jpg", "caption": "Western blot\u2028of lysates."},
        {"image": "PMC_missing.jpg", "caption": LONG_CAPTION},
        {
            "image": "PMC101_F2_1.jpg",
            "caption": "Schematic diagram " + "of the proposed signalling pathway " * 4,
        },
    ]
    (root / "pmc_oa.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{oops\n", encoding="utf-8"
    )
    conv = converter("pmc_oa", root, exclude_modalities=["Simulated illustration"])
    cases, rejects = split(list(conv.iter_cases()))
    case = cases["PMC212319_Fig3_4"]
    assert case.images[0].path == str(imgs / "PMC212319_Fig3_4.jpg")
    assert case.labels["modality"] == "CT" and case.labels["body_part"] == "Abdomen"
    assert case.labels["diseases"] == ["mass", "hemangioma"]
    assert conv.caption(case) == LONG_CAPTION
    assert conv.offline_qa(case) == [
        ("What kind of image is this?", "This is a CT image."),
        ("Which body region does the figure concern?", "It concerns the abdomen and pelvis."),
    ]
    assert rejects["PMC100_F1_1"] == "pmc_oa.jsonl line 2: caption has 4 words (< min_caption_words=20)"
    assert rejects["PMC_missing"] == "pmc_oa.jsonl line 3: image file not found"
    assert rejects["PMC101_F2_1"] == "pmc_oa.jsonl line 4: modality 'Simulated illustration' is excluded"
    assert rejects["pmc_oa:5"].startswith("pmc_oa.jsonl line 5: not JSON")
    # a pluggable classifier replaces the keyword rules
    custom = converter("pmc_oa", root, classifier=lambda text: {"modality": "MR", "body_part": "Thorax"})
    assert split(list(custom.iter_cases()))[0]["PMC212319_Fig3_4"].labels["modality"] == "MR"


NXML = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.2 20190208//EN" "JATS-archivearticle1.dtd">
<article xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:mml="http://www.w3.org/1998/Math/MathML" article-type="case-report">
<front><article-meta><article-id pub-id-type="pmc">13900</article-id></article-meta></front>
<body><sec><title>Case</title>
<fig id="F1" position="float"><label>Figure 1</label>
<caption><title>Chest radiograph.</title><p>Posteroanterior chest radiograph of a 62-year-old patient showing a
right upper lobe consolidation with air bronchograms, in keeping with lobar pneumonia; no pleural effusion
and a normal cardiac silhouette &#8212; Gr&#246;&#223;e normal.</p></caption>
<graphic xlink:href="bcr-3-1-055-1"/></fig>
<fig id="F2"><label>Figure 2</label><caption><p>Too short.</p></caption><graphic xlink:href="bcr-3-1-055-2"/></fig>
<fig id="F3"><label>Figure 3</label><caption><p>A caption long enough to pass the word filter but the image file
of this figure is simply absent from the package folder in this fixture tree.</p></caption>
<graphic xlink:href="bcr-3-1-055-3"/></fig>
</sec></body></article>
"""


def test_pmc_oa_packages_and_mvd_layouts(tmp_path: Path) -> None:
    root = tmp_path / "oa"
    pkg = root / "PMC13900"
    pkg.mkdir(parents=True)
    (pkg / "bcr-3-1-055.nxml").write_text(NXML, encoding="utf-8")
    jpeg(pkg / "bcr-3-1-055-1.jpg", 1, size=(120, 90))
    Image.new("P", (30, 20)).save(pkg / "bcr-3-1-055-1.gif")  # the thumbnail next to the full figure
    jpeg(pkg / "bcr-3-1-055-2.jpg", 2)
    conv = converter("pmc_oa", root)
    assert conv.detect() == "packages"
    cases, rejects = split(list(conv.iter_cases()))
    case = cases["PMC13900/F1"]
    assert case.images[0].path.endswith("bcr-3-1-055-1.jpg")  # .jpg beats the .gif thumbnail
    cap = case.text["caption"]
    assert cap.startswith("Chest radiograph. Posteroanterior chest radiograph of a 62-year-old patient")
    assert "Größe" in cap and "—" in cap  # entities decoded, non-ASCII intact
    assert case.labels["label"] == "Figure 1" and case.labels["modality"] == "X-ray"
    assert case.labels["body_part"] == "Thorax" and "pneumonia" in case.labels["diseases"]
    assert "caption has 2 words" in rejects["PMC13900/F2"]
    assert rejects["PMC13900/F3"].endswith("image file not found")

    mvd = tmp_path / "mvd"
    (mvd / "captions").mkdir(parents=True)
    png(mvd / "images2" / "PMC555" / "fig1.png", 4)
    png(mvd / "images2" / "PMC555" / "fig2.png", 5)
    accented = LONG_CAPTION + " Größe 3 µm × 4 µm, Sjögren syndrome."
    garbled = accented.encode("utf-8").decode("unicode_escape")  # what MVD's caption step did to it
    assert garbled != accented and "Ã¶" in garbled
    items = [
        {"image_filename": "fig1", "label": "Figure 1", "title": "", "caption": LONG_CAPTION},
        {"image_filename": "fig9", "label": "Figure 9", "title": "", "caption": LONG_CAPTION},
        {"image_filename": "fig2", "label": "Figure 2", "title": "", "caption": garbled},
    ]
    (mvd / "captions" / "PMC555.json").write_text(json.dumps(items), encoding="utf-8")
    cases, rejects = split(list(converter("pmc_oa", mvd).iter_cases()))
    assert cases["PMC555/fig1"].images[0].path.endswith("images2/PMC555/fig1.png")
    assert "caption_repaired" not in cases["PMC555/fig1"].labels
    assert "image file not found" in rejects["PMC555/fig9"]
    # the garbling is undone; correct non-ASCII text is left alone
    assert (
        cases["PMC555/fig2"].text["caption"] == accented and cases["PMC555/fig2"].labels["caption_repaired"]
    )
    assert undo_unicode_escape("Größe") == "Größe" and undo_unicode_escape("plain") == "plain"

    # MVD's variant: PMC-OA's split files beside captions/ + images2/ select whole figures by pmcid + url_name
    rows = [
        {"image": "PMC555_F1_1.jpg", "caption": "a subcaption", "pmcid": "PMC555", "url_name": "fig1.jpg"},
        {"image": "PMC555_F1_2.jpg", "caption": "another one", "pmcid": "PMC555", "url_name": "fig1.jpg"},
        {"image": "PMC555_F7_1.jpg", "caption": "x", "pmcid": "PMC555", "url_name": "fig7.jpg"},
        {"image": "PMC999_F1_1.jpg", "caption": "x", "pmcid": "PMC999", "url_name": "f1.jpg"},
        {"image": "PMC555_F2_1.jpg", "caption": "x"},
    ]
    (mvd / "train.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n", encoding="utf-8")
    conv = converter("pmc_oa", mvd)
    assert conv.detect() == "mvd"
    conv.check_layout()
    cases, rejects = split(list(conv.iter_cases()))
    assert list(cases) == ["PMC555/fig1"]  # once, with the figure's own caption; fig2 and fig9 not selected
    assert cases["PMC555/fig1"].text["caption"] == clean_text(LONG_CAPTION)
    assert rejects == {
        "train:5": "train.jsonl line 5: no `pmcid` / `url_name` field",
        "PMC999/f1": "captions/PMC999.json not found",
        "PMC555/fig7": "figure 'fig7' is not in captions/PMC555.json",
    }


def test_pmc_oa_reads_tar_gz_packages(tmp_path: Path) -> None:
    import tarfile

    pkg = tmp_path / "build" / "PMC13900"  # the package as PMC ships it: PMC<n>/ inside PMC<n>.tar.gz
    pkg.mkdir(parents=True)
    (pkg / "bcr-3-1-055.nxml").write_text(NXML, encoding="utf-8")
    jpeg(pkg / "bcr-3-1-055-1.jpg", 1, size=(120, 90))
    Image.new("P", (30, 20)).save(pkg / "bcr-3-1-055-1.gif")
    (pkg / "bcr-3-1-055.pdf").write_bytes(b"%PDF-1.4")  # not needed: not unpacked
    root = tmp_path / "oa"
    nested = root / "oa_package" / "08" / "e0"
    nested.mkdir(parents=True)
    with tarfile.open(nested / "PMC13900.tar.gz", "w:gz") as tar:
        tar.add(pkg, arcname="PMC13900")
    (nested / "PMC77.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    unpacked = tmp_path / "unpacked"
    conv = converter("pmc_oa", root, extract_dir=str(unpacked))
    assert conv.detect() == "packages"
    cases, rejects = split(list(conv.iter_cases()))
    case = cases["PMC13900/F1"]
    assert Path(case.images[0].path) == unpacked / "PMC13900" / "bcr-3-1-055-1.jpg"  # .jpg beats the .gif
    assert case.text["caption"].startswith("Chest radiograph.") and "Größe" in case.text["caption"]
    assert sorted(p.name for p in (unpacked / "PMC13900").iterdir()) == [
        ".unpacked",
        "bcr-3-1-055-1.gif",
        "bcr-3-1-055-1.jpg",
        "bcr-3-1-055.nxml",
    ]
    assert re.search(r"PMC77.tar.gz: unreadable package \(", rejects["PMC77.tar.gz"])
    # a second run reads the unpacked folder; an extracted PMC<n>/ beside the archive wins over it
    assert sorted(split(list(conv.iter_cases()))[0]) == sorted(cases)
    (root / "PMC13900").mkdir()
    (root / "PMC13900" / "bcr-3-1-055.nxml").write_text(NXML, encoding="utf-8")
    jpeg(root / "PMC13900" / "bcr-3-1-055-1.jpg", 3)
    again = split(list(converter("pmc_oa", root, extract_dir=str(unpacked)).iter_cases()))[0]
    assert Path(again["PMC13900/F1"].images[0].path) == root / "PMC13900" / "bcr-3-1-055-1.jpg"
    # a package unpacked in place (its archive deleted) is found at any depth
    shutil.rmtree(root / "PMC13900")
    (nested / "PMC13900.tar.gz").unlink()
    shutil.copytree(pkg, nested / "PMC13900")
    again = split(list(converter("pmc_oa", root, extract_dir=str(unpacked)).iter_cases()))[0]
    assert Path(again["PMC13900/F1"].images[0].path) == nested / "PMC13900" / "bcr-3-1-055-1.jpg"


# -- Quilt-1M ---------------------------------------------------------------------------------------------------------


def test_quilt_csv_layout(tmp_path: Path) -> None:
    root = tmp_path / "Quilt"
    images = root / "quilt_1m"
    jpeg(images / "vid123_image_aaa.jpg", 1)
    jpeg(images / "vid456_image_bbb.jpg", 2)
    header = [
        "",
        "caption",
        "image_path",
        "subset",
        "split",
        "pathology",
        "roi_text",
        "noisy_text",
        "corrected_text",
        "med_umls_ids",
        "magnification",
        "height",
        "width",
        "single_wsi",
        "not_histology",
    ]
    rows = [
        [
            0,
            'high power shows nuclear pleomorphism, "atypical" mitoses\nand necrosis',
            "vid123_image_aaa.jpg",
            "quilt",
            "train",
            "['Dermatopathology', 'Soft tissue']",
            "['this area of necrosis']",
            "so here",
            "So here",
            "[[{'entity': 'necrosis', 'cui': 'C0027540'}], [{'entity': 'mitoses'}]]",
            "2.0",
            1080,
            1920,
            1,
            0,
        ],
        [
            1,
            "same frame, second narration",
            "vid123_image_aaa.jpg",
            "quilt",
            "val",
            "[]",
            "[]",
            "",
            "",
            "[]",
            "",
            1080,
            1920,
            0,
            0,
        ],
        [
            2,
            "a slide of the lecture title",
            "vid456_image_bbb.jpg",
            "quilt",
            "train",
            "[]",
            "[]",
            "",
            "",
            "[]",
            "0.0",
            1080,
            1920,
            0,
            1,
        ],
        [
            3,
            "missing frame",
            "vid789_image_ccc.jpg",
            "openpath",
            "train",
            "nan",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            0,
        ],
    ]
    root.mkdir(exist_ok=True)
    with (root / "quilt_1M_lookup-001.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    conv = converter("quilt", root)
    cases, rejects = split(list(conv.iter_cases()))
    assert sorted(cases) == ["0", "1"]  # rows are samples: the same image twice
    c = cases["0"]
    assert c.text["caption"] == 'high power shows nuclear pleomorphism, "atypical" mitoses and necrosis'
    assert (
        c.labels["pathology"] == ["Dermatopathology", "Soft tissue"] and c.labels["magnification"] == "high"
    )
    assert c.labels["umls_entities"] == ["necrosis", "mitoses"] and c.labels["roi_text"] == [
        "this area of necrosis"
    ]
    assert c.images[0].path == str(images / "vid123_image_aaa.jpg")
    assert ("Which pathology subspecialty does this image belong to?", "Dermatopathology, Soft tissue.") in (
        conv.offline_qa(c)
    )
    assert rejects["2"] == "quilt_1M_lookup-001.csv row 3: flagged not_histology=1 (not a histology image)"
    assert "vid789_image_ccc.jpg not found" in rejects["3"]
    assert sorted(split(list(converter("quilt", root, split="val").iter_cases()))[0]) == ["1"]
    # the frame's two rows are two samples, not duplicates of each other; another source's copy of the frame is
    from cambrian_core.data.filters import RecordFilter, filter_files
    from cambrian_core.data.runner import convert
    from cambrian_core.registry import GENERATORS

    convert(conv, build(GENERATORS, {"type": "template"}), tmp_path / "out", progress=False)
    records = [r for _, r in iter_records(tmp_path / "out" / "records.jsonl")]
    assert {r["provenance"]["group"] for r in records} == {"frame:vid123_image_aaa.jpg"}
    copy = {**records[0], "id": "other:1:0", "provenance": {"source": "other", "source_id": "1"}}
    with (tmp_path / "out" / "records.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(copy) + "\n")
    flt = RecordFilter(min_caption_words=1)  # the default rules otherwise, exact-image dedup included
    stats = filter_files(
        [tmp_path / "out" / "records.jsonl"], tmp_path / "out" / "f.jsonl", record_filter=flt
    )
    assert stats.kept == len(records) and stats.dropped == {"duplicate": 1}
    (root / "quilt_1M_lookup-001.csv").write_text("caption,path\nx,y\n", encoding="utf-8")
    with pytest.raises(LayoutError, match=r"lacks column\(s\) \['image_path'\]"):
        conv.check_layout()


# -- Eurorad ----------------------------------------------------------------------------------------------------------


def eurorad_tree(tmp_path: Path) -> Path:
    root = tmp_path / "eurorad"
    records = [
        {
            "id": 18321,
            "title": "Pneumatosis intestinalis",
            "SECTION": "Abdominal imaging",
            "CLINICAL_HISTORY": "A 67-year-old man presented with abdominal distension.",
            "IMAGING_FINDINGS": "CT shows intramural gas in the ileum without portal venous gas.",
            "DISCUSSION": "Pneumatosis intestinalis is gas within the bowel wall; benign causes are common.",
            "FINAL_DIAGNOSIS": "Pneumatosis intestinalis",
            "DIFFERENTIAL_DIAGNOSIS_LIST": "Pneumatosis intestinalis; Pseudopneumatosis; Bowel ischaemia",
            "img": [
                {"img_id": "1a", "img_alt2": "Axial CT, lung window: intramural gas."},
                {"img_id": "1b", "img_alt2": "Coronal CT reformat."},
                {"img_id": "2", "img_alt2": "Figure without a file."},
            ],
        },
        {
            "title": "Lung / pleura: pneumothorax?",
            "Clinical History": "Sudden chest pain in a tall young man.",
            "Final Diagnosis": "Primary spontaneous pneumothorax",
            "img": [{"img_id": "1", "img_alt2": "PA chest radiograph."}],
        },
        {"title": "No figures on disk", "CLINICAL_HISTORY": "x", "img": [{"img_id": "9"}]},
    ]
    root.mkdir()
    (root / "eurorad.json").write_text(json.dumps(records), encoding="utf-8")
    jpeg(root / "images" / "Pneumatosis_intestinalis" / "1a.jpg", 1)
    png(root / "images" / "Pneumatosis_intestinalis" / "1b.png", 2)
    jpeg(root / "images" / "Lung___pleura__pneumothorax_" / "1.jpeg", 3)
    return root


def test_eurorad_single_and_multi_views(tmp_path: Path) -> None:
    root = eurorad_tree(tmp_path)
    single = converter("eurorad", root)
    cases, rejects = split(list(single.iter_cases()))
    assert sorted(cases) == ["18321/1a", "18321/1b", "Lung___pleura__pneumothorax_/1"]
    c = cases["18321/1a"]
    assert single.caption(c) == "Axial CT, lung window: intramural gas."
    assert c.labels["missing_figures"] == ["2"]
    assert c.labels["differential_diagnosis"] == [
        "Pneumatosis intestinalis",
        "Pseudopneumatosis",
        "Bowel ischaemia",
    ]
    qa = dict(single.offline_qa(c))
    assert (
        qa[
            "Clinical history: A 67-year-old man presented with abdominal distension.\nWhat is the most likely "
            "diagnosis?"
        ]
        == "Pneumatosis intestinalis"
    )
    lung = cases["Lung___pleura__pneumothorax_/1"]
    assert lung.text["title"] == "Lung / pleura: pneumothorax?"  # raw title kept, folder sanitised
    assert lung.text["clinical_history"] == "Sudden chest pain in a tall young man."
    assert "none of its figures ['9'] found" in rejects["No_figures_on_disk"]

    multi = converter("eurorad", root, views="multi")
    cases, _ = split(list(multi.iter_cases()))
    m = cases["18321"]
    assert [Path(r.path).name for r in m.images] == ["1a.jpg", "1b.png"]
    assert [r.view for r in m.images] == ["figure 1a", "figure 1b"]
    assert multi.caption(m) == "CT shows intramural gas in the ileum without portal venous gas."
    questions = [q for q, _ in multi.offline_qa(m)]
    assert (
        "Describe the imaging findings." in questions
        and "Discuss the case in light of these images." in questions
    )


def test_eurorad_finds_mvd_folders_named_by_the_raw_title(tmp_path: Path) -> None:
    root = tmp_path / "eu"
    titles = ["Crohn disease ", "Tom &amp; Jerry sign", "Lymphoma / leukaemia?", "Not on disk"]
    recs = [
        {"title": t, "FINAL_DIAGNOSIS": "d", "img": [{"img_id": "1a", "img_alt2": "Axial CT"}]}
        for t in titles
    ]
    for t in titles[:3]:
        png(root / "EURORAD" / t / "1a.png", 1)  # MVD writes each case under its title as it is
    root.mkdir(exist_ok=True)
    (root / "eurorad.json").write_text(json.dumps(recs), encoding="utf-8")
    cases, rejects = split(list(converter("eurorad", root).iter_cases()))
    assert sorted(cases) == ["Crohn_disease/1a", "Lymphoma___leukaemia_/1a", "Tom_&_Jerry_sign/1a"]
    assert cases["Tom_&_Jerry_sign/1a"].text["title"] == "Tom & Jerry sign"
    assert rejects["Not_on_disk"].endswith(
        "none of its figures ['1a'] found (looked in folders ['Not_on_disk', 'Not on disk'] under images/, "
        "EURORAD/, ./)"
    )


def test_eurorad_multi_view_through_runner(tmp_path: Path) -> None:
    from cambrian_core.data.runner import convert
    from cambrian_core.registry import GENERATORS

    root = eurorad_tree(tmp_path)
    out = tmp_path / "out"
    summary = convert(
        converter("eurorad", root, views="multi"),
        build(GENERATORS, {"type": "template"}),
        out,
        progress=False,
    )
    records = [r for _, r in iter_records(out / "records.jsonl")]
    assert summary.converted == 2 and len(records) >= 3
    multi = next(r for r in records if r["id"].startswith("eurorad:18321:"))
    assert isinstance(multi["image"], list) and len(multi["image"]) == 2
    assert all((out / p).is_file() and Image.open(out / p).format == "PNG" for p in multi["image"])
    assert all(conversation_problem(r) is None for r in records)
    assert multi["provenance"]["source"] == "eurorad" and multi["provenance"]["source_id"] == "18321"
    assert "CC BY-NC-SA 4.0" in multi["provenance"]["license"]


# -- Radiopaedia ------------------------------------------------------------------------------------------------------


def test_radiopaedia_json_studies_and_csv_mapping(tmp_path: Path) -> None:
    root = tmp_path / "rp"
    for name, seed in (("s1_ax_0.jpg", 1), ("s1_ax_1.jpg", 2), ("s2_cor.png", 3)):
        (jpeg if name.endswith(".jpg") else png)(root / "images" / "Osteoid_osteoma" / name, seed)
    records = [
        {
            "rID": 12345,
            "title": "Osteoid osteoma",
            "presentation": "Night pain relieved by aspirin.",
            "age": "15 years",
            "sex": "Male",
            "system": "Musculoskeletal",
            "discussion": "Classic osteoid osteoma of the tibia.",
            "diagnosis": "Osteoid osteoma",
            "studies": [
                {
                    "modality": "CT",
                    "findings": "Cortical nidus with surrounding sclerosis.",
                    "series": [
                        {
                            "plane": "axial",
                            "images": ["Osteoid_osteoma/s1_ax_0.jpg", "Osteoid_osteoma/s1_ax_1.jpg"],
                        }
                    ],
                },
                {
                    "modality": "MRI",
                    "findings": "Marrow oedema.",
                    "images": ["Osteoid_osteoma/s2_cor.png", "Osteoid_osteoma/gone.png"],
                },
            ],
        },
        {"rID": 999, "title": "Nothing on disk", "findings": "x"},
    ]
    root.mkdir(exist_ok=True)
    (root / "radiopaedia_cases.json").write_text(json.dumps(records), encoding="utf-8")
    multi = converter("radiopaedia", root, views="multi")
    cases, rejects = split(list(multi.iter_cases()))
    ct = cases["12345/s0"]
    assert [r.view for r in ct.images] == ["axial", "axial"] and ct.labels["modality"] == "CT"
    assert multi.caption(ct) == "Cortical nidus with surrounding sclerosis."
    qa = multi.offline_qa(ct)
    assert qa[0] == (
        "Presentation: 15 years Male; Night pain relieved by aspirin.\nWhat is the most likely diagnosis?",
        "Osteoid osteoma",
    )
    assert cases["12345/s1"].labels["missing_images"] == ["Osteoid_osteoma/gone.png"]
    assert rejects["999"].endswith(
        "no images listed and no case folder (looked for ['Nothing_on_disk', 'Nothing on disk', '999'] in . and "
        "images/)"
    )
    single = split(list(converter("radiopaedia", root).iter_cases()))[0]
    assert sorted(single) == ["12345/s0/0", "12345/s0/1", "12345/s1/0"]

    # CSV with custom column names and images found in the case folder (the reference scripts' layout)
    csv_root = tmp_path / "rp_csv"
    jpeg(csv_root / "Lung_abscess" / "a.jpg", 5)
    jpeg(csv_root / "Lung_abscess" / "b.jpg", 6)
    with (csv_root / "20240801_radiopaedia.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["Heading", "Study Findings", "Final dx"])
        w.writerow(["Lung abscess", "Thick-walled cavity with an air-fluid level.", "Lung abscess"])
    mapped = converter(
        "radiopaedia", csv_root, mapping={"title": "Heading", "diagnosis": "Final dx"}, views="multi"
    )
    (case,) = split(list(mapped.iter_cases()))[0].values()
    assert [Path(r.path).name for r in case.images] == ["a.jpg", "b.jpg"]
    assert case.text["findings"] == "Thick-walled cavity with an air-fluid level."
    assert case.text["diagnosis"] == "Lung abscess"
    with pytest.raises(LayoutError, match=r"no column for `title`.*mapping="):
        converter("radiopaedia", csv_root)
    with pytest.raises(ValueError, match=r"unknown mapping field\(s\) \['finding'\]"):
        build(DATASETS, {"type": "radiopaedia", "src": str(csv_root), "mapping": {"finding": "x"}})


def test_radiopaedia_python_literal_cells_mvd_folders_and_bad_cells(tmp_path: Path) -> None:
    root = tmp_path / "rp"
    jpeg(root / "images" / "b.jpg", 1)
    jpeg(root / "Hip_pain:_what_now_" / "c.jpg", 2)  # MVD's rule maps only / ? and space to _
    with (root / "radiopaedia.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["rid", "title", "findings", "diagnosis", "studies"])
        w.writerow(
            ["1", "Case one", "f", "Dx", "[{'modality': 'CT', 'findings': 'Mass.', 'images': ['b.jpg']}]"]
        )
        w.writerow(["2", "Hip pain: what now?", "Effusion.", "Dx", ""])
        w.writerow(["3", "Broken", "f", "Dx", "[{'modality': 'CT', 'images': ['b.jpg']"])
    cases, rejects = split(list(converter("radiopaedia", root).iter_cases()))
    assert cases["1/0"].labels["modality"] == "CT" and cases["1/0"].text["findings"] == "Mass."
    assert Path(cases["2/0"].images[0].path).name == "c.jpg"
    assert list(rejects) == ["3"]
    assert re.search(
        r"radiopaedia.csv row 3: column studies: neither JSON .* nor a Python literal: ", rejects["3"]
    )
    bad = tmp_path / "rp_json"
    bad.mkdir()
    (bad / "radiopaedia_cases.json").write_text('[{"rID": 1,}]', encoding="utf-8")
    with pytest.raises(LayoutError, match=r"radiopaedia_cases.json is not valid JSON .* line 1, column 12"):
        list(converter("radiopaedia", bad).iter_cases())


# -- LLaVA importer -----------------------------------------------------------------------------------------------------


def test_llava_importer_validates_every_record(tmp_path: Path) -> None:
    root = tmp_path / "llava"
    jpeg(root / "imgs" / "a.jpg", 1)
    png(root / "imgs" / "b.png", 2)
    good = {
        "id": "g1",
        "image": "imgs/a.jpg",
        "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"},
            {"from": "gpt", "value": "A chest CT."},
            {"from": "human", "value": "Any nodule?"},
            {"from": "gpt", "value": "No."},
        ],
    }
    records = [
        good,
        {
            "id": "roles",
            "image": "imgs/b.png",
            "conversations": [
                {"role": "user", "value": "<image>\nDescribe."},
                {"role": "assistant", "value": "An MRI."},
            ],
        },
        {
            "id": "multi",
            "image": ["imgs/a.jpg", "imgs/b.png"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nCompare."},
                {"from": "gpt", "value": "Same patient."},
            ],
        },
        {"id": "missing", "image": "imgs/nope.png", "conversations": good["conversations"]},
        {"id": "count", "image": ["imgs/a.jpg", "imgs/b.png"], "conversations": good["conversations"]},
        {
            "id": "order",
            "image": "imgs/a.jpg",
            "conversations": [{"from": "gpt", "value": "<image>\nHello"}, {"from": "human", "value": "Hi"}],
        },
        {
            "id": "empty",
            "image": "imgs/a.jpg",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": " "}],
        },
        {"id": "system", "conversations": [{"from": "system", "value": "x"}]},
        {
            "id": "notoken",
            "image": "imgs/a.jpg",
            "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A CT."}],
        },
        {
            "id": "text",
            "image": "nan",
            "conversations": [
                {"from": "human", "value": "What is pneumonia?"},
                {"from": "gpt", "value": "A lung infection."},
            ],
        },
    ]
    (root / "data.json").write_text(json.dumps(records), encoding="utf-8")
    conv = converter("llava", root)
    cases, rejects = split(list(conv.iter_cases()))
    assert sorted(cases) == ["g1", "multi", "roles", "text"]
    assert conv.offline_qa(cases["g1"]) == [("What is shown?", "A chest CT."), ("Any nodule?", "No.")]
    assert conv.offline_qa(cases["roles"]) == [("Describe.", "An MRI.")]
    assert len(cases["multi"].images) == 2 and cases["text"].images == []
    assert rejects["missing"] == f"data.json item 3: image file(s) ['imgs/nope.png'] not found under {root}"
    assert rejects["count"] == "data.json item 4: 1 <image> token(s) for 2 image(s)"
    assert "turn 0 is from 'gpt', expected 'human'" in rejects["order"]
    assert rejects["empty"] == "data.json item 6: turn 1 (gpt) is empty"
    assert "role 'system'" in rejects["system"]
    assert rejects["notoken"] == "data.json item 8: 0 <image> token(s) for 1 image(s)"
    fixed = split(list(converter("llava", root, fix_image_tokens=True).iter_cases()))[0]
    assert "notoken" in fixed
    captions = converter("llava", root / "data.json", stage="caption")
    c = split(list(captions.iter_cases()))[0]["roles"]
    assert captions.caption(c) == "An MRI." and captions.offline_qa(c) == []
    (root / "more.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(LayoutError, match=r"exactly one \(found \['data.json', 'more.jsonl'\]\)"):
        build(DATASETS, {"type": "llava", "src": str(root)}).check_layout()


def test_llava_import_through_runner_keeps_conversations(tmp_path: Path) -> None:
    from cambrian_core.data.runner import convert
    from cambrian_core.registry import GENERATORS

    root = tmp_path / "llava"
    jpeg(root / "a.jpg", 1)
    rec = {
        "id": "g1",
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"},
            {"from": "gpt", "value": "A chest CT."},
            {"from": "human", "value": "Any nodule?"},
            {"from": "gpt", "value": "No."},
        ],
    }
    bad = {"id": "b1", "image": "zzz.jpg", "conversations": rec["conversations"]}
    (root / "set.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    convert(converter("llava", root), build(GENERATORS, {"type": "template"}), out, progress=False)
    (got,) = [r for _, r in iter_records(out / "records.jsonl")]
    assert got["conversations"] == [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "A chest CT."},
        {"from": "human", "value": "Any nodule?"},
        {"from": "gpt", "value": "No."},
    ]
    assert got["stage"] == "instruct" and (out / got["image"]).is_file()
    (reject,) = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["case_id"] == "b1" and "not found" in reject["reason"]


def test_llava_med_misspelt_conversatons_key_is_read(tmp_path: Path) -> None:
    root = tmp_path / "pvqa"
    jpeg(root / "test" / "test_0012.jpg", 1)
    turns = [{"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "granuloma"}]
    records = [  # vqa_formats.md §5: PathVQA's LLaVA-Med files spell it `conversatons`
        {"id": 300012003, "image": "test/test_0012.jpg", "answer_type": "OPEN", "conversatons": turns},
        {"id": 7, "image": "test/test_0012.jpg", "conversations": turns, "conversatons": []},  # ours wins
        {"id": 8, "image": "test/test_0012.jpg"},
    ]
    (root / "test.json").write_text(json.dumps(records), encoding="utf-8")
    conv = converter("llava", root)
    cases, rejects = split(list(conv.iter_cases()))
    assert sorted(cases) == ["300012003", "7"] and list(rejects) == ["8"]
    assert conv.offline_qa(cases["300012003"]) == [("What is shown?", "granuloma")]
    assert conv.offline_qa(cases["7"]) == [("What is shown?", "granuloma")]


def test_eurorad_differentials_split_on_lines_semicolons_and_capitalised_commas() -> None:
    from cambrian_plugins.datasets.eurorad import _differentials

    assert _differentials("Lymphoma\nSarcoidosis\r\ntuberculosis") == [
        "Lymphoma",
        "Sarcoidosis",
        "tuberculosis",
    ]
    assert _differentials("Abscess;  necrotic   tumour; Lymphoma, diffuse type") == [
        "Abscess",
        "necrotic tumour",
        "Lymphoma, diffuse type",  # a lower-case word after a comma continues the item
    ]
    assert _differentials("Abscess, Lymphoma") == ["Abscess", "Lymphoma"]
    assert _differentials(float("nan")) == _differentials(" \n ") == []
