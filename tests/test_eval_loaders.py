"""Benchmark loaders on fixtures written in each release's real file layout (made-up values, true structure;
see ../shared/spec/vqa_formats.md), including the traps that layout is known for."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import pytest
from PIL import Image

from cambrian_core.eval.items import DataLayoutError
from cambrian_core.eval.loaders import BENCHMARKS, benchmark, load_benchmark


def jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (seed * 40 % 256, 80, 120)).save(path, format="JPEG")


# ----------------------------------------------------------------------------------------------- VQA-RAD
def rad_row(qid, phrase, image, q, a, atype, qtype, frame="NULL"):  # the OSF JSON's 14 keys, in order
    return {
        "qid": qid,
        "phrase_type": phrase,
        "qid_linked_id": f"a1b2c3d4-0000-4000-8000-{qid:012d}",
        "image_case_url": "https://medpix.nlm.nih.gov/case?id=made-up",
        "image_name": image,
        "image_organ": "CHEST",
        "evaluation": "given",
        "question": q,
        "question_rephrase": "NULL",
        "question_relation": "NULL",
        "question_frame": frame,
        "question_type": qtype,
        "answer": a,
        "answer_type": atype,
    }


@pytest.fixture
def vqa_rad_osf(tmp_path: Path) -> Path:
    root = tmp_path / "osf_download" / "VQA_RAD"
    images = root / "VQA_RAD Image Folder"
    for i, name in enumerate(["synpic100.jpg", "synpic200.jpg", "synpic300.jpg"]):  # synpic300 is never used
        jpeg(images / name, i)
    rows = [
        rad_row(1, "freeform", "synpic100.jpg", "Is there a pleural effusion?", "No", "CLOSED", "PRES"),
        rad_row(2, "para", "synpic100.jpg", "Is fluid seen in the pleura?", "no", "CLOSED ", "PRES, POS"),
        rad_row(
            3,
            "test_freeform",
            "synpic100.jpg",
            "How many ribs are fractured?",
            2,
            "OPEN",
            "COUNT",
            frame="How many fractures are in the image?",
        ),
        rad_row(4, "test_para", "synpic200.jpg", "Is the mass calcified?", "Yes", "CLOSED ", "ATRIB"),
        rad_row(5, "test_freeform", "synpic200.jpg", "What organ is shown?", "Lungs", "OPEN", "Other"),
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows, indent=1))
    (root / "VQA_RAD Dataset Public.xml").write_text("<VQA_RAD/>")
    (root / "Readme.docx").write_bytes(b"PK")
    return tmp_path / "osf_download"


def test_vqa_rad_osf_official_test_split(vqa_rad_osf: Path) -> None:
    es = load_benchmark("VQA-RAD", vqa_rad_osf)
    assert (es.benchmark, es.split) == ("vqa_rad", "test")
    assert [it.qid for it in es.items] == ["3", "4", "5"]  # test_freeform + test_para rows only
    count, calcified, organ = es.items
    assert count.answer == "2" and count.answer_type == "open"  # integer answer -> string
    assert count.meta["question_frame"] == "How many fractures are in the image?"
    assert calcified.answer_type == "closed"  # "CLOSED " with the trailing space
    assert calcified.question_type == "ATTRIB" and organ.question_type == "OTHER"
    assert "question_rephrase" not in calcified.meta  # "NULL"
    assert Path(count.images[0]).name == "synpic100.jpg" and Path(count.images[0]).is_file()
    assert "VQA_RAD Image Folder" in count.images[0]
    assert list(es.source_hashes()) == ["VQA_RAD Dataset Public.json"]
    assert "official 451-question" in es.notes[0]


def test_vqa_rad_osf_train_and_bad_split(vqa_rad_osf: Path) -> None:
    es = load_benchmark("vqa_rad", vqa_rad_osf, "train")
    assert [it.qid for it in es.items] == ["1", "2"]
    assert es.items[1].question_type == "PRES, POS" and es.items[1].answer_type == "closed"
    with pytest.raises(DataLayoutError, match="vqa_rad has no split 'val'; splits: train, test"):
        load_benchmark("vqa_rad", vqa_rad_osf, "val")


def test_vqa_rad_missing_image_is_named(vqa_rad_osf: Path) -> None:
    os.remove(vqa_rad_osf / "VQA_RAD" / "VQA_RAD Image Folder" / "synpic200.jpg")
    with pytest.raises(DataLayoutError, match=r"1 referenced image\(s\) are missing .*synpic200.jpg"):
        load_benchmark("vqa_rad", vqa_rad_osf)


def test_vqa_rad_mevf_layout(tmp_path: Path) -> None:
    root = tmp_path / "data_RAD"
    jpeg(root / "images" / "synpic100.jpg")
    row = {
        "qid": 7,
        "image_name": "synpic100.jpg",
        "image_organ": "ABD",
        "answer": "Yes",
        "answer_type": "CLOSED",
        "question_type": "PRES",
        "question": "Is there free fluid?",
        "phrase_type": "freeform",
    }
    framed = {**row, "qid": 8, "phrase_type": "frame", "question": "Is free fluid present in the image?"}
    (root / "trainset.json").write_text(json.dumps([row, framed]))
    (root / "testset.json").write_text(json.dumps([{**row, "qid": 9, "answer": 3, "answer_type": "OPEN"}]))
    train = load_benchmark("vqa_rad", tmp_path, "train")
    assert [it.qid for it in train.items] == ["7", "8"]  # framed questions are rows in this layout
    assert train.items[1].meta["phrase_type"] == "frame"
    test = load_benchmark("vqa_rad", root)
    assert test.items[0].answer == "3" and "MEVF" in test.notes[0]
    with pytest.raises(DataLayoutError, match=r"none of .*VQA_RAD Dataset Public.json"):
        load_benchmark("vqa_rad", root, layout="osf")


# ------------------------------------------------------------------------------------------------- SLAKE
@pytest.fixture
def slake(tmp_path: Path) -> Path:
    root = tmp_path / "Slake1.0"
    for n in (1, 2, 3):
        folder = root / "imgs" / f"xmlab{n}"
        jpeg(folder / "source.jpg", n)
        Image.new("L", (8, 8)).save(folder / "mask.png")
        (folder / "detection.json").write_text(json.dumps([{"Atelectasis": [1.0, 2.0, 3.0, 4.0]}]))
        (folder / "question.json").write_text("[]")

    def row(qid, img, q, a, lang, atype, content, base="vqa", content_last=False):
        head = {
            "img_id": img,
            "img_name": f"xmlab{img}/source.jpg",
            "question": q,
            "answer": a,
            "q_lang": lang,
            "location": "Lung",
            "modality": "X-Ray",
            "answer_type": atype,
            "base_type": base,
        }
        tail = {"triple": ["vhead", "_", "_"], "qid": qid}
        if content_last:  # 23% of the release's rows put content_type after qid
            return {**head, **tail, "content_type": content}
        return {**head, "content_type": content, **tail}

    test = [
        row(100, 3, "Which organ is abnormal?", "Lung, Heart", "en", "OPEN", "Abnormality"),
        row(101, 3, "Is the lung healthy?", "No", "en", "CLOSED", "Abnormality", content_last=True),
        row(102, 3, "Which side is the lesion on?", "Left", "en", "CLOSED", "Position"),
        row(103, 1, "肺部健康吗?", "否", "zh", "CLOSED", "Abnormality"),
    ]
    (root / "test.json").write_text(json.dumps(test, ensure_ascii=False))
    (root / "train.json").write_text(
        json.dumps([row(1, 1, "What modality is used?", "X-Ray", "en", "OPEN", "Modality")])
    )
    (root / "validate.json").write_text(
        json.dumps([row(50, 2, "Is this a CT?", "No", "en", "CLOSED", "Modality")])
    )
    (tmp_path / "KG.zip").write_bytes(b"PK")
    return tmp_path


def test_slake_english_test(slake: Path) -> None:
    es = load_benchmark("slake", slake)
    assert [it.qid for it in es.items] == ["100", "101", "102"]
    organ, healthy, side = es.items
    assert (
        organ.answer == "Lung, Heart" and organ.answer_type == "open" and organ.question_type == "Abnormality"
    )
    assert healthy.question_type == "Abnormality"  # read by name whatever the key order
    assert side.answer_type == "closed" and side.answer == "Left"  # CLOSED is not only yes/no
    assert organ.images[0].endswith(os.path.join("Slake1.0", "imgs", "xmlab3", "source.jpg"))
    assert organ.meta == {"modality": "X-Ray", "location": "Lung", "base_type": "vqa", "img_id": 3}


def test_slake_chinese_and_all(slake: Path) -> None:
    zh = load_benchmark("slake-zh", slake)
    assert zh.benchmark == "slake_zh" and [it.qid for it in zh.items] == ["103"]
    assert zh.items[0].lang == "zh" and zh.items[0].answer_type == "closed"
    both = BENCHMARKS["slake"].loader.func(slake, "test", lang="all")
    assert len(both) == 4 and {it.lang for it in both.items} == {"en", "zh"}


def test_slake_validation_file_names(slake: Path) -> None:
    root = slake / "Slake1.0"
    assert [it.qid for it in load_benchmark("slake", slake, "val").items] == ["50"]
    os.rename(root / "validate.json", root / "validation.json")  # the Hugging Face upload's name
    es = load_benchmark("slake", root, "validation")
    assert es.split == "validate" and [it.qid for it in es.items] == ["50"]
    os.remove(root / "validation.json")
    with pytest.raises(DataLayoutError, match=r"validate.json or validation.json is missing"):
        load_benchmark("slake", root, "validate")


# ----------------------------------------------------------------------------------------------- PathVQA
@pytest.fixture
def pvqa(tmp_path: Path) -> Path:
    root = tmp_path / "pvqa"
    for split, n in (("train", 1), ("val", 2), ("test", 2)):
        for i in range(n):
            jpeg(root / "images" / split / f"{split}_{i:04d}.jpg", i)
    (root / "qas" / "test").mkdir(parents=True)
    rows = [
        {"image": "test_0000", "question": "What is present?", "answer": "granuloma"},
        {"image": "test_0001", "question": "Is this a carcinoma?", "answer": "yes"},
        {"image": "test_0001", "question": "How are the nuclei arranged?", "answer": "in palisades"},
    ]
    with open(root / "qas" / "test" / "test_qa.pkl", "wb") as f:
        pickle.dump(rows, f)
    lxmert = [  # LXMERT-style file only, for val
        {
            "img_id": "val_0001",
            "question_id": 300012003,
            "sent": "Does the image show fibrosis?",
            "label": {"no": 1},
            "answer_type": "yes/no",
        },
        {
            "img_id": "val_0000",
            "question_id": 300012004,
            "sent": "Where is this?",
            "label": {"liver": 1, "lung": 0.3},
        },
    ]
    with open(root / "qas" / "val_vqa.pkl", "wb") as f:
        pickle.dump(lxmert, f)
    return tmp_path


def test_pathvqa_original_pickles(pvqa: Path) -> None:
    es = load_benchmark("pathvqa", pvqa)
    assert [it.qid for it in es.items] == ["test_00000", "test_00001", "test_00002"]
    present, carcinoma, nuclei = es.items
    assert present.images[0].endswith(os.path.join("pvqa", "images", "test", "test_0000.jpg"))  # ".jpg" added
    assert present.answer_type == "open" and carcinoma.answer_type == "closed"
    assert (carcinoma.question_type, nuclei.question_type) == ("is", "how")
    val = load_benchmark("path-vqa", pvqa, "validation")
    assert val.split == "val" and [it.qid for it in val.items] == ["300012003", "300012004"]
    assert val.items[0].answer == "no" and val.items[1].answer == "liver"  # highest-scored label


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pathvqa_pickles_cannot_run_code(pvqa: Path) -> None:
    with open(pvqa / "pvqa" / "qas" / "test" / "test_qa.pkl", "wb") as f:
        pickle.dump([_Exploit()], f)
    with pytest.raises(DataLayoutError, match=r"refusing to load .*system"):
        load_benchmark("pathvqa", pvqa)
    with pytest.raises(DataLayoutError, match=r"neither .*train_qa.pkl nor .*train_vqa.pkl exists"):
        load_benchmark("pathvqa", pvqa, "train")


# ----------------------------------------------------------------------------------------------- PMC-VQA
def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_pmc_vqa_v1_test_clean(tmp_path: Path) -> None:
    root = tmp_path / "PMC-VQA"
    jpeg(root / "images" / "PMC100001_F2.jpg")
    jpeg(root / "images" / "PMC100002_F1.jpg")
    header = [
        "Figure_path",
        "Question",
        "Anwser",
        "Choice A",
        "Choice B",
        "Choice C",
        "Choice D",
        "Answer_label",
    ]
    write_csv(
        root / "test_clean.csv",
        header,
        [
            [
                "PMC100001_F2.jpg",
                "What imaging modality is shown?",
                "CT scan",
                "A:MRI",
                " B: CT scan ",
                "C:Ultrasound",
                "D:PET",
                "B",
            ],
            [
                "PMC100002_F1.jpg",
                "Where is the lesion, relative to the liver?",
                "Below, near the kidney",
                "A:Above",
                "B:Below, near the kidney",
                "C:Inside",
                "D:Lateral",
                "B",
            ],
        ],
    )
    es = load_benchmark("pmc-vqa", tmp_path)
    assert es.split == "test_clean" and [it.qid for it in es.items] == ["test_clean-0", "test_clean-1"]
    first, second = es.items
    assert first.choices == (("A", "MRI"), ("B", "CT scan"), ("C", "Ultrasound"), ("D", "PET"))
    assert first.answer_label == "B" and first.answer == "CT scan" and first.kind == "choice"
    assert second.answer == "Below, near the kidney"  # quoted cell with a comma
    assert "v1" in es.notes[0]


def test_pmc_vqa_v2_letter_in_answer(tmp_path: Path) -> None:
    root = tmp_path
    jpeg(root / "figures" / "PMC9_F1.jpg")
    header = [
        "index",
        "Figure_path",
        "Caption",
        "Question",
        "Choice A",
        "Choice B",
        "Choice C",
        "Choice D",
        "Answer",
        "split",
    ]
    write_csv(
        root / "test_2.csv",
        header,
        [
            [
                "17",
                "PMC9_F1.jpg",
                "Axial CT, arrow: mass",
                "What does the arrow show?",
                "A:Mass",
                "B:Cyst",
                "C:Stone",
                "D:Air",
                "A",
                "test",
            ],
        ],
    )
    es = load_benchmark("pmc_vqa", root, "test2")
    it = es.items[0]
    assert es.split == "test_2" and it.qid == "17" and it.answer_label == "A" and it.answer == "Mass"
    assert it.images[0].endswith(os.path.join("figures", "PMC9_F1.jpg")) and it.meta["split"] == "test"
    write_csv(
        root / "test_2.csv",
        header,
        [["18", "PMC9_F1.jpg", "c", "q?", "A:x", "B:y", "C:z", "D:w", "Mass", "test"]],
    )
    with pytest.raises(DataLayoutError, match="gold letter column Answer holds 'Mass', not A-D"):
        load_benchmark("pmc_vqa", root, "test_2")
    with pytest.raises(DataLayoutError, match=r"test.csv is missing"):
        load_benchmark("pmc_vqa", root, "test")


# ------------------------------------------------------------------------------------------ generic JSONL
def test_jsonl_flat_and_llava_med_formats(tmp_path: Path) -> None:
    jpeg(tmp_path / "imgs" / "a.jpg")
    flat = [
        {"question_id": "q1", "image": "imgs/a.jpg", "question": "Is there a mass?", "answer": "no"},
        {
            "id": "q2",
            "images": ["imgs/a.jpg"],
            "question": "Modality?",
            "answer": "CT",
            "choices": ["MRI", "CT", "US"],
            "answer_label": "b",
        },
        {
            "qid": "q3",
            "image": "imgs/a.jpg",
            "text": "Which organ?",
            "answer": "liver",
            "question_type": "ORGAN",
        },
    ]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in flat) + "\n")
    es = load_benchmark("jsonl", tmp_path)
    mass, modality, organ = es.items
    assert mass.answer_type == "closed" and organ.answer_type == "open" and organ.question_type == "ORGAN"
    assert modality.kind == "choice" and modality.answer_label == "B" and modality.answer == "CT"
    assert Path(mass.images[0]) == tmp_path / "imgs" / "a.jpg"
    llava = [
        {
            "id": 300012003,
            "image": "a.jpg",
            "answer_type": "CLOSED ",
            "question_type": "is",
            "conversatons": [
                {"from": "human", "value": "Is this normal?\n<image>"},
                {"from": "gpt", "value": "yes"},
            ],
        },
    ]
    (tmp_path / "test_llava.json").write_text(json.dumps(llava))
    es2 = load_benchmark("jsonl", tmp_path / "test_llava.json", image_folder=tmp_path / "imgs")
    assert es2.items[0].question == "Is this normal?" and es2.items[0].qid == "300012003"
    assert es2.items[0].answer_type == "closed"


def test_jsonl_errors(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text('{"question_id": 1, "question": "q?"}\n')
    with pytest.raises(DataLayoutError, match="record 1: needs `question` and `answer`"):
        load_benchmark("jsonl", tmp_path)
    (tmp_path / "test.jsonl").write_text(
        '{"question_id": 1, "question": "q?", "answer": "a", "image": "x.png"}\n'
    )
    with pytest.raises(DataLayoutError, match=r"missing .*x.png"):
        load_benchmark("jsonl", tmp_path)
    (tmp_path / "test.jsonl").write_text('{"question_id": 1, "question": "q", "answer": "a"}\n' * 2)
    with pytest.raises(DataLayoutError, match="question id '1' occurs twice"):
        load_benchmark("jsonl", tmp_path)
    with pytest.raises(DataLayoutError, match=r"no dev.jsonl or dev.json .*found: \['test.jsonl'\]"):
        load_benchmark("jsonl", tmp_path, "dev")


def test_benchmark_table() -> None:
    assert benchmark("VQARAD").name == "vqa_rad" and benchmark("pvqa").name == "pathvqa"
    assert BENCHMARKS["pmc_vqa"].default_split == "test_clean"
    assert BENCHMARKS["vqa_rad"].options() == ["layout"] and BENCHMARKS["slake"].options() == []
    with pytest.raises(ValueError, match="unknown benchmark 'mimic'; benchmarks: vqa_rad, slake"):
        benchmark("mimic")
    with pytest.raises(ValueError, match=r"slake takes no option\(s\) \['layout'\]"):
        load_benchmark("slake", "/nonexistent", layout="osf")
    with pytest.raises(DataLayoutError, match="data folder /nonexistent does not exist"):
        load_benchmark("slake", "/nonexistent")
