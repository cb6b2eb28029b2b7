"""Record filters (each rule on hand-made records), perceptual hashing, the mixer and the `cambrian data` CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cambrian_core.data.classify import KeywordClassifier, medical_domain
from cambrian_core.data.filters import RecordFilter, filter_files
from cambrian_core.data.mix import MixError, MixInput, mix, parse_mix_input
from cambrian_core.data.perceptual_hash import NearDuplicateIndex, dhash, hamming, phash
from cambrian_core.data.records import conversation_problem, iter_records


def scan(seed: int, size: int = 96) -> Image.Image:
    """A smooth random 'scan' (structure at several scales, like a real image)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (8, 8), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (size, size))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def rec(
    rid: str,
    image: Any,
    answer: str,
    stage: str = "instruct",
    source: str = "pmc_oa",
    case: str | None = None,
    question: str = "What does the CT show?",
) -> dict:
    n = len(image) if isinstance(image, list) else (1 if image else 0)
    r = {
        "id": rid,
        "conversations": [
            {"from": "human", "value": "<image>\n" * n + question},
            {"from": "gpt", "value": answer},
        ],
        "stage": stage,
        "provenance": {"source": source, "source_id": case or rid},
    }
    if image is not None:
        r["image"] = image
    return r


def test_phash_near_duplicate_and_distinct() -> None:
    a = scan(1)
    recompressed = a.resize((80, 80)).filter(ImageFilter.GaussianBlur(0.6))
    assert hamming(phash(a), phash(recompressed)) <= 4
    assert hamming(dhash(a), dhash(recompressed)) <= 8
    assert hamming(phash(a), phash(scan(2))) > 12
    index = NearDuplicateIndex(max_distance=4)
    index.add(phash(a), "a")
    index.add(phash(scan(2)), "b")
    assert index.find(phash(recompressed))[0] == "a"
    assert index.find(phash(scan(3))) is None
    # the pigeonhole index agrees with brute force
    values = [phash(scan(s)) for s in range(20)]
    idx = NearDuplicateIndex(max_distance=20)
    for i, v in enumerate(values[:10]):
        idx.add(v, i)
    for v in values[10:]:
        brute = {i: hamming(v, w) for i, w in enumerate(values[:10]) if hamming(v, w) <= 20}
        found = idx.find_all(v)
        assert dict(found) == brute and [d for _, d in found] == sorted(brute.values())


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (rec("ok", "a.png", "Axial CT of the chest."), None),
        ({**rec("two", "a.png", "x"), "image": ["a.png", "b.png"]}, "1 <image> token(s) for 2 image(s)"),
        (
            {**rec("t", "a.png", "x"), "conversations": [{"from": "gpt", "value": "x"}]},
            "turn 0 is from 'gpt'",
        ),
        (
            {**rec("t", "a.png", "x"), "conversations": [{"from": "human", "value": "<image>\nq"}]},
            "ends with a human",
        ),
        (rec("e", "a.png", "   "), "turn 1 (gpt) is empty"),
        (
            {**rec("r", "a.png", "x"), "conversations": [{"role": "user", "value": "<image>"}]},
            "must be an object with",
        ),
        (rec("txt", None, "x", question="What is pneumonia?"), None),
        (rec("g", "a.png", "see <image>"), "2 <image> token(s) for 1 image(s)"),
    ],
)
def test_conversation_validity(record: dict, problem: str | None) -> None:
    found = conversation_problem(record)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n", encoding="utf-8")
    return path


def test_filter_rules_and_rejects(tmp_path: Path) -> None:
    src = tmp_path / "set"
    (src / "img").mkdir(parents=True)
    scan(1).save(src / "img" / "a.png")
    scan(1).resize((90, 90)).save(src / "img" / "a_resized.jpg", quality=95)  # near duplicate, other format
    scan(1).save(src / "img" / "a_copy.png")  # byte-identical copy
    scan(2).save(src / "img" / "b.png")
    scan(4).save(src / "img" / "d.png")
    Image.new("L", (96, 96), 40).save(src / "img" / "blank.png")
    scan(3, size=16).save(src / "img" / "tiny.png")
    (src / "img" / "broken.png").write_bytes((src / "img" / "b.png").read_bytes()[:200])
    cap = "Axial contrast-enhanced CT of the abdomen shows a hypodense liver lesion with rim enhancement."
    records = [
        rec("keep-1", "img/a.png", cap, stage="caption", case="fig1"),
        rec(
            "keep-1b", "img/a.png", "A hypodense lesion.", case="fig1"
        ),  # same case, other stage/record: kept
        rec("exact", "img/a_copy.png", cap, stage="caption", case="fig2"),
        rec("near", "img/a_resized.jpg", cap, stage="caption", case="fig3"),
        rec(
            "keep-2",
            "img/b.png",
            "Chest radiograph with a right lower lobe consolidation, in keeping with pneumonia.",
            stage="caption",
        ),
        rec("short", "img/d.png", "CT liver.", stage="caption"),
        rec("blank", "img/blank.png", cap),
        rec("tiny", "img/tiny.png", cap),
        rec("broken", "img/broken.png", cap),
        rec("missing", "img/nothing.png", cap),
        {**rec("tokens", "img/a.png", cap), "image": ["img/a.png", "img/b.png"]},
        rec(
            "chart",
            "img/d.png",
            "Bar chart of survival rates per treatment group.",
            question="What does the figure plot?",
        ),
        rec(
            "other-source",
            "img/d.png",
            "Bar chart of survival rates per treatment group.",
            source="padchest",
            question="What does the figure plot?",
        ),
    ]
    inp = write(src / "records.jsonl", records)
    out = tmp_path / "clean" / "train.jsonl"
    stats = filter_files([inp], out, record_filter=RecordFilter(min_caption_words=5))
    kept = [r for _, r in iter_records(out)]
    assert [r["id"] for r in kept] == ["keep-1", "keep-1b", "keep-2", "other-source"]
    assert kept[0]["image"] == "../set/img/a.png" and (out.parent / kept[0]["image"]).is_file()
    rejects = {
        r["id"]: r
        for r in map(json.loads, (tmp_path / "clean" / "train.rejects.jsonl").read_text().splitlines())
    }
    reasons = {k: (v["rule"], v["reason"]) for k, v in rejects.items() if k}
    assert reasons["exact"] == ("duplicate", "exact duplicate of keep-1")
    assert reasons["near"][0] == "duplicate" and reasons["near"][1].startswith(
        "near duplicate of keep-1 (pHash"
    )
    assert reasons["short"] == ("caption_length", "caption has 2 words (< min_caption_words=5)")
    assert reasons["blank"] == ("image", "image blank.png is blank (pixel std < 2.0)")
    assert reasons["tiny"] == ("image", "image tiny.png is 16x16 px (< min_image_size=32)")
    assert reasons["broken"][0] == "image" and "cannot be decoded" in reasons["broken"][1]
    assert reasons["missing"][0] == "image" and "does not exist" in reasons["missing"][1]
    assert reasons["tokens"] == ("conversation", "1 <image> token(s) for 2 image(s)")
    assert reasons["chart"][0] == "domain" and "non-image figure" in reasons["chart"][1]
    assert rejects[None]["rule"] == "json" and "not valid JSON" in rejects[None]["reason"]
    assert rejects["exact"]["record"]["image"] == "img/a_copy.png"
    assert stats.as_dict() == {
        "total": 14,
        "kept": 4,
        "dropped": {
            "caption_length": 1,
            "conversation": 1,
            "domain": 1,
            "duplicate": 2,
            "image": 4,
            "json": 1,
        },
    }


def test_filter_options_change_verdicts(tmp_path: Path) -> None:
    scan(1).save(tmp_path / "a.png")
    scan(1).filter(ImageFilter.GaussianBlur(2)).save(tmp_path / "a2.png")  # 2 bits away
    recs = [
        rec("a", "a.png", "One two three four five six."),
        rec("b", "a2.png", "One two three four five six."),
    ]
    inp = write(tmp_path / "in.jsonl", recs)
    s1 = filter_files([inp], tmp_path / "o1.jsonl", record_filter=RecordFilter(dedup="exact"))
    assert s1.kept == 2
    distance = hamming(phash(Image.open(tmp_path / "a.png")), phash(Image.open(tmp_path / "a2.png")))
    assert 0 < distance <= 4
    s2 = filter_files([inp], tmp_path / "o2.jsonl", record_filter=RecordFilter(phash_distance=distance))
    s3 = filter_files([inp], tmp_path / "o3.jsonl", record_filter=RecordFilter(phash_distance=distance - 1))
    assert (s2.kept, s3.kept) == (1, 2)
    calls = []

    def no_b(record: dict) -> tuple[bool, str]:
        calls.append(record["id"])
        return record["id"] != "b", "custom rule"

    s4 = filter_files(
        [inp],
        tmp_path / "o4.jsonl",
        record_filter=RecordFilter(dedup="none", domain=no_b, domain_sources=None),
    )
    assert (s4.kept, dict(s4.dropped)) == (1, {"domain": 1, "json": 1}) and calls == ["a", "b"]
    with pytest.raises(ValueError, match="dedup must be"):
        RecordFilter(dedup="fuzzy")
    with pytest.raises(ValueError, match=r"expected 'package\.module:function'"):
        RecordFilter(domain="not_a_spec")


def test_keyword_classifier_and_domain() -> None:
    clf = KeywordClassifier()
    c = clf(
        "Axial contrast-enhanced CT of the abdomen showing a hepatocellular carcinoma and liver cirrhosis."
    )
    assert (c.modality, c.body_part) == ("CT", "Abdomen") and c.diseases == ["carcinoma", "cirrhosis"]
    assert clf("H&E stained section, x200, showing granulomas.").modality == "Pathology"
    assert clf("T2-weighted MRI of the brain").as_labels() == {
        "modality": "MR",
        "body_part": "Head & neck",
        "diseases": [],
    }
    assert medical_domain("Chest radiograph.")[0]
    assert medical_domain("Western blot of protein lysates")[0] is False
    assert medical_domain("The team photo at the annual meeting")[1].startswith("names no imaging modality")


@pytest.mark.parametrize(
    ("caption", "body_part"),
    [  # keywords match at word starts only: the words inside other words are traps
        ("Axial CT of the abdomen showing an incidental hypodense liver cyst.", "Abdomen"),  # not "dental"
        ("Sagittal MRI of the knee: tear of the outer third of the meniscus.", "Lower"),  # not "uter"
        ("MRI of the calf showing a tear of the medial gastrocnemius muscle.", "Lower"),  # not "gastr"
        ("Radiograph of the femur; the arrow marks the correct position of the nail.", "Lower"),  # not "rect"
        ("Electron micrograph of a hepatocyte with abundant ribosomes.", "Abdomen"),  # not "rib"
        ("Dental panoramic radiograph.", "Head & neck"),
        ("CT of the rectum and uterus.", "Abdomen"),
        ("Fracture of the 5th rib.", "Thorax"),
        ("Intrahepatic bile duct dilatation on MRCP.", "Abdomen"),
        ("Musculoskeletal ultrasound of the tendon.", "Extremity"),
    ],
)
def test_body_part_keywords_match_whole_word_starts(caption: str, body_part: str) -> None:
    assert KeywordClassifier()(caption).body_part == body_part


@pytest.mark.parametrize(
    ("caption", "modality"),
    [  # angiography is DSA only when catheter-based: CT, MR and optical angiography keep their modality
        ("Axial CT angiography shows a saccular aneurysm of the anterior communicating artery.", "CT"),
        ("Coronal CTA of the abdomen shows a dissection flap in the aorta.", "CT"),
        ("Magnetic resonance angiography of the circle of Willis shows occlusion of the left MCA.", "MR"),
        ("Time-of-flight MR angiography of the circle of Willis.", "MR"),
        ("MRA of the renal arteries shows a stenosis.", "MR"),
        (
            "Fluorescein angiography of the right eye shows leakage from choroidal neovascularisation.",
            "Optical Image",
        ),
        ("Indocyanine green angiography of the macula.", "Optical Image"),
        ("OCTA of the macula shows a neovascular membrane.", "OCT"),
        ("Digital subtraction angiography of the left internal carotid artery.", "DSA"),
        ("DSA shows the aneurysm first seen on CT.", "DSA"),
        ("Catheter angiography confirmed the aneurysm.", "DSA"),
        ("Coronary angiogram showing occlusion of the LAD.", "DSA"),  # names no other modality
    ],
)
def test_angiography_goes_to_its_modality(caption: str, modality: str) -> None:
    assert KeywordClassifier()(caption).modality == modality


def test_mix_ratios_manifest_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = [rec(f"a{i}", "x.png", "c", stage="caption" if i % 2 else "instruct", source="A") for i in range(40)]
    b = [rec(f"b{i}", "y.png", "c", stage="instruct", source="B") for i in range(10)]
    pa = write(tmp_path / "a" / "a.jsonl", a)
    pb = write(tmp_path / "b" / "b.jsonl", b)
    out = tmp_path / "mix" / "train.jsonl"
    m = mix([MixInput("A", pa, 3), MixInput("B", pb, 1)], out, total=20, seed=7)
    assert m["total"] == 20 and m["sources"]["A"]["selected"] == 15 and m["sources"]["B"]["selected"] == 5
    assert m["sources"]["A"]["available"] == 40 and m["sources"]["A"]["unreadable_lines"] == 1
    assert m["sources"]["B"]["by_stage"] == {"instruct": 5}
    assert sum(m["sources"]["A"]["by_stage"].values()) == 15
    assert m["by_stage"]["instruct"] == 5 + m["sources"]["A"]["by_stage"].get("instruct", 0)
    rows = [r for _, r in iter_records(out)]
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert {r["provenance"]["mix_input"] for r in rows} == {"A", "B"}
    assert next(r for r in rows if r["id"].startswith("b"))["image"] == "../b/y.png"
    assert json.loads((tmp_path / "mix" / "train.manifest.json").read_text())["sources"]["A"]["ratio"] == 3
    # same seed -> same mix; other seed -> other mix
    again = tmp_path / "mix" / "again.jsonl"
    mix([MixInput("A", pa, 3), MixInput("B", pb, 1)], again, total=20, seed=7)
    assert again.read_text() == out.read_text()
    # ratio as share of each source; stage filter; upsampling needs replace
    m2 = mix([MixInput("A", pa, 0.5), MixInput("B", pb, 1)], tmp_path / "m2.jsonl", stage="instruct")
    assert (m2["sources"]["A"]["selected"], m2["sources"]["B"]["selected"]) == (10, 10)
    with pytest.raises(MixError, match=r"source 'B' has 10 records but the mix needs 20; pass replace=True"):
        mix([MixInput("B", pb, 2)], tmp_path / "m3.jsonl")
    m4 = mix([MixInput("B", pb, 2)], tmp_path / "m4.jsonl", replace=True)
    ids = [r["id"] for _, r in iter_records(tmp_path / "m4.jsonl")]
    assert len(ids) == 20 and len(set(ids)) == 20 and m4["sources"]["B"]["unique_selected"] == 10
    # replace only allows upsampling: a ratio-1 source beside an upsampled one keeps every record, once
    m5 = mix([MixInput("A", pa, 1), MixInput("B", pb, 2.5)], tmp_path / "m5.jsonl", replace=True)
    assert (
        m5["sources"]["A"]["unique_selected"]
        == m5["sources"]["A"]["selected"]
        == sum(isinstance(r, dict) for _, r in iter_records(pa))
    )
    assert (m5["sources"]["B"]["selected"], m5["sources"]["B"]["unique_selected"]) == (25, 10)
    # ids stay unique over the whole mix: the same file under two names, and ids already ending in "~N"
    twice = mix([MixInput("B", pb, 1), MixInput("again", pb, 1)], tmp_path / "m6.jsonl")
    ids = [r["id"] for _, r in iter_records(tmp_path / "m6.jsonl")]
    assert twice["total"] == 20 and len(set(ids)) == 20 and {f"b{i}~2" for i in range(10)} <= set(ids)
    tilde = write(tmp_path / "b" / "t.jsonl", [rec(i, "y.png", "c", source="T") for i in ("t", "t~2", "t")])
    mix([MixInput("T", tilde, 1)], tmp_path / "m7.jsonl")
    ids = sorted(r["id"] for _, r in iter_records(tmp_path / "m7.jsonl"))
    assert len(set(ids)) == 3 and {"t", "t~2"} < set(ids)  # the third is "t~3" or "t~2~2" (draw order)
    assert parse_mix_input("pmc=/data/pmc.jsonl:0.25") == MixInput("pmc", Path("/data/pmc.jsonl"), 0.25)
    assert parse_mix_input("x=C:/d/x.jsonl") == MixInput("x", Path("C:/d/x.jsonl"), 1.0)
    with pytest.raises(MixError, match="NAME=PATH"):
        parse_mix_input("just-a-path.jsonl")


# -- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_filter_mix_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cambrian_core.cli import main

    (tmp_path / "img").mkdir()
    for i in range(4):
        scan(10 + i).convert("RGB").save(tmp_path / "img" / f"{i}.png")
    cap = "Coronal T2-weighted MRI of the knee shows a tear of the medial meniscus posterior horn."
    recs = [rec(f"r{i}", f"img/{i}.png", cap, stage="caption", source="eurorad") for i in range(4)]
    recs.append(rec("dup", "img/0.png", cap, stage="caption", source="eurorad"))
    inp = write(tmp_path / "records.jsonl", recs)
    clean = tmp_path / "clean.jsonl"
    assert main(["data", "filter", str(inp), "--out", str(clean), "--min-caption-words", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kept"] == 4 and report["dropped"] == {"duplicate": 1, "json": 1}

    out = tmp_path / "mix" / "mix.jsonl"
    assert (
        main(["data", "mix", "--input", f"euro={clean}:1", "--out", str(out), "--total", "3", "--seed", "1"])
        == 0
    )
    assert "wrote 3 records" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "mix" / "mix.manifest.json").read_text())
    assert manifest["sources"]["euro"]["selected"] == 3 and manifest["by_stage"] == {"caption": 3}
    assert main(["data", "mix", "--input", f"euro={clean}:1", "--out", str(out), "--total", "9"]) == 2
    assert "has 4 records but the mix needs 9" in capsys.readouterr().err
    noisy = tmp_path / "noisy.jsonl"
    noisy.write_text(clean.read_text() + "{not json\n")
    assert main(["data", "mix", "--input", f"noisy={noisy}:1", "--out", str(tmp_path / "m2.jsonl")]) == 0
    assert "warning: noisy: 1 unreadable line(s) skipped" in capsys.readouterr().err

    grid = tmp_path / "grid.png"
    assert main(["data", "show", str(out), "--n", "2", "--grid", str(grid), "--cols", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("── ") == 2 and "medial meniscus" in printed and "image: ../img/" in printed
    with Image.open(grid) as g:
        assert g.format == "PNG" and g.size == (2 * 262 + 6, 256 + 96 + 12)
        px = np.asarray(g.convert("L"))
    assert px[6:262, 6:262].std() > 10  # the first record's scan was drawn, not left blank
    assert px[262:358, 6:262].min() < 100  # caption text below it


def test_filter_refuses_to_overwrite_its_input_and_leaves_nothing_half_done(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    good = {
        "id": "a",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
    }
    src.write_text(json.dumps(good) + "\n")
    before = src.read_bytes()
    flt = RecordFilter(check_images=False, min_caption_words=0, domain=None)
    with pytest.raises(ValueError, match=r"--out .*in\.jsonl is one of the inputs"):
        filter_files([src], src, record_filter=flt)
    with pytest.raises(ValueError, match=r"--rejects .*in\.jsonl is one of the inputs"):
        filter_files([src], tmp_path / "out.jsonl", rejects=src, record_filter=flt)
    with pytest.raises(ValueError, match=r"--out .* is a folder"):
        filter_files([src], tmp_path, record_filter=flt)
    assert src.read_bytes() == before
    # a missing second input is found before anything is written
    with pytest.raises(FileNotFoundError, match=r"no record file at .*nope\.jsonl"):
        filter_files([src, tmp_path / "nope.jsonl"], tmp_path / "out.jsonl", record_filter=flt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    with pytest.raises(ValueError, match="min_image_size must be >= 0, got -1"):
        RecordFilter(min_image_size=-1)
    with pytest.raises(ValueError, match="max_caption_words 2 is below min_caption_words 5"):
        RecordFilter(min_caption_words=5, max_caption_words=2)


def test_a_binary_file_is_not_read_as_records(tmp_path: Path) -> None:
    png = tmp_path / "scan.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(ValueError, match=r"scan\.png is not a UTF-8 text record file .* not an image"):
        list(iter_records(png))
    with pytest.raises(FileNotFoundError, match="a folder there"):
        list(iter_records(tmp_path))


def test_mix_names_a_bad_ratio_and_total(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text("{}\n")
    with pytest.raises(MixError, match="--input a: ratio must be a number >= 0, got 'abc'"):
        parse_mix_input(f"a={src}:abc")
    with pytest.raises(MixError, match="--total must be >= 1, got -5"):
        mix([MixInput("a", src, 1)], tmp_path / "m.jsonl", total=-5)


def test_record_files_with_a_byte_order_mark(tmp_path: Path) -> None:
    recs = [
        {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}
    ] * 2
    array = tmp_path / "a.json"
    array.write_text(json.dumps(recs), encoding="utf-8-sig")  # as Windows tools write it
    lines = tmp_path / "a.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8-sig")
    for path in (array, lines):
        got = [r for _, r in iter_records(path)]
        assert got == recs, path.name


def test_the_same_record_twice_is_a_duplicate_whatever_its_case(tmp_path: Path) -> None:
    src = tmp_path / "set"
    (src / "img").mkdir(parents=True)
    scan(1).save(src / "img" / "a.png")
    cap = "Axial contrast-enhanced CT of the abdomen shows a hypodense liver lesion with rim enhancement."
    one = rec("eurorad:1:0", "img/a.png", cap, stage="caption", case="fig1")
    other = rec("eurorad:1:1", "img/a.png", "A hypodense lesion.", case="fig1")  # the same case's QA: kept
    text_only = {
        "id": "t",
        "conversations": [
            {"from": "human", "value": "Is a fracture of the femur seen on this CT?"},
            {"from": "gpt", "value": "Yes, a displaced fracture of the femur on CT."},
        ],
    }
    inp = write(src / "records.jsonl", [one, other, one, text_only, text_only])
    out = tmp_path / "clean" / "train.jsonl"
    for mode in ("exact", "phash"):
        stats = filter_files([inp, inp], out, record_filter=RecordFilter(min_caption_words=1, dedup=mode))
        assert [r["id"] for _, r in iter_records(out)] == ["eurorad:1:0", "eurorad:1:1", "t"], mode
        assert stats.as_dict()["dropped"] == {"duplicate": 7, "json": 2}, mode  # write() adds a bad line
    rejects = [json.loads(x) for x in (tmp_path / "clean" / "train.rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["reason"] == "identical to record eurorad:1:0"
