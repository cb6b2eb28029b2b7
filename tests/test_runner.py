"""The resumable runner: kill -9 and rerun equals an uninterrupted run; rejects; shards; limits; the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cambrian_core.cli import main
from cambrian_core.data.output_store import OutputStore, RunConflictError
from cambrian_core.data.runner import convert, in_shard, parse_shard
from cambrian_core.registry import DATASETS, GENERATORS

sys.path.insert(0, str(Path(__file__).parent))
from convert_helpers import FlakyTemplate, SlowTemplate, ct_tree

TESTS = Path(__file__).parent


def _dicom(src) -> object:
    return DATASETS.get("dicom")(str(src))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _snapshot(out: Path) -> dict:
    images = {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted((out / "images").rglob("*"))
        if p.is_file()
    }
    return {
        "records": (out / "records.jsonl").read_bytes(),
        "rejects": (out / "rejects.jsonl").read_bytes(),
        "done": sorted(_lines(out / "done.txt")),
        "images": images,
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return ct_tree(tmp_path_factory.mktemp("ct") / "src", n=40)


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    summary = convert(_dicom(tree), SlowTemplate(), out, progress=False)
    return out, summary


def test_uninterrupted_run_records_and_rejects(reference):
    out, summary = reference
    assert summary.converted == 40 and summary.rejected == {"converter": 1, "image": 1}
    assert summary.records == 80  # a caption and an instruct record per case
    records = [json.loads(line) for line in _lines(out / "records.jsonl")]
    assert len({r["id"] for r in records}) == 80
    first = records[0]
    assert first["id"] == "dicom:case000:0" and first["image"] == "images/dicom/case000.png"
    assert first["provenance"] == {
        "source": "dicom",
        "source_id": "case000",
        "generator": "template",
        "prompt_version": "template-v1",
        "license": None,
    }
    instruct = records[1]["conversations"]
    assert instruct[0]["value"].startswith("<image>\n") and instruct[1]["from"] == "gpt"
    assert {"from": "gpt", "value": "The chest is examined."} in instruct  # DICOM-header QA
    rejects = {r["case_id"]: r for r in map(json.loads, _lines(out / "rejects.jsonl"))}
    assert (
        rejects["zz_truncated"]["kind"] == "image" and "zz_truncated.dcm" in rejects["zz_truncated"]["reason"]
    )
    assert "not an image object" in rejects["zz_report"]["reason"]
    assert sorted(_lines(out / "done.txt")) == sorted(
        [f"case{i:03d}" for i in range(40)] + ["zz_report", "zz_truncated"]
    )
    assert json.loads((out / "summary.json").read_text())["converted"] == 40


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kill9_then_rerun_equals_uninterrupted(tree, reference, tmp_path, workers):
    out = tmp_path / "out"
    script = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from convert_helpers import SlowTemplate\n"
        "from cambrian_core.data.runner import convert\n"
        "from cambrian_core.registry import DATASETS\n"
        "if __name__ == '__main__':\n"
        f"    convert(DATASETS.get('dicom')({str(tree)!r}), SlowTemplate(delay=0.1), {str(out)!r}, "
        f"workers={workers}, progress=False, batch_size=3, flush_seconds=0.05)\n"
    )
    (tmp_path / "run.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], env=env)
    deadline = time.monotonic() + 120
    while len(_lines(out / "done.txt")) < 8:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the runner itself, mid-run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = len(_lines(out / "done.txt"))
    assert 8 <= finished < 42, finished
    time.sleep(1.0)  # orphaned workers notice the parent is gone and exit
    summary = convert(_dicom(tree), SlowTemplate(), out, progress=False)
    assert (
        summary.skipped["already_done"] >= finished
        and summary.converted + summary.skipped["already_done"] >= 40
    )
    assert _snapshot(out) == _snapshot(reference[0])  # same records, same order, no duplicate, same images
    done = _lines(out / "done.txt")
    assert len(done) == len(set(done)) == 42


def test_resume_drops_unfinished_and_partial_lines(tmp_path):
    info = {"source": "s", "generator": "g"}
    store = OutputStore(tmp_path, info)
    rec = lambda cid, k: {"id": f"s:{cid}:{k}", "provenance": {"source_id": cid}}  # noqa: E731
    store.commit([rec("a", 0), rec("a", 1)], [], ["a"])
    store.commit([], [{"source": "s", "case_id": "b", "reason": "bad", "kind": "image"}], ["b"])
    store.close()
    # a crash after the records of c were written but before its id reached done.txt, in the middle of
    # writing d's record, of a retryable failure's reject line and of an id
    with open(tmp_path / "records.jsonl", "a") as f:
        f.write(json.dumps(rec("c", 0)) + "\n" + '{"id": "s:d:0", "provenance": {"sour')
    with open(tmp_path / "rejects.jsonl", "a") as f:
        f.write(json.dumps({"source": "s", "case_id": "e", "reason": "timeout", "retry": True}) + "\n")
    with open(tmp_path / "done.txt", "a") as f:
        f.write("c")  # partial: no newline
    store = OutputStore(tmp_path, info)
    assert store.done == {"a", "b"}
    assert store.dropped == {"records.jsonl": 2, "rejects.jsonl": 1}
    assert [json.loads(x)["id"] for x in _lines(tmp_path / "records.jsonl")] == ["s:a:0", "s:a:1"]
    assert [json.loads(x)["case_id"] for x in _lines(tmp_path / "rejects.jsonl")] == ["b"]
    assert (tmp_path / "done.txt").read_text() == "a\nb\n"
    with pytest.raises(RunConflictError, match="in use by another conversion run"):
        OutputStore(tmp_path, info)
    store.close()
    with pytest.raises(RunConflictError, match=r"other settings \(generator: 'g' there, 'openai' now\)"):
        OutputStore(tmp_path, {"source": "s", "generator": "openai"})


def test_failures_are_retried_and_bad_records_rejected(tree, tmp_path):
    out = tmp_path / "out"
    flaky = FlakyTemplate(fail=("case003",), bad=("case005",))
    summary = convert(_dicom(tree), flaky, out, progress=False, limit=8)
    assert summary.failed == 1 and summary.converted == 6
    assert summary.rejected == {"record": 1}
    rejects = {r["case_id"]: r for r in map(json.loads, _lines(out / "rejects.jsonl"))}
    assert (
        rejects["case003"]["retry"] is True
        and "ConnectionError: API unreachable" in rejects["case003"]["reason"]
    )
    assert rejects["case005"]["reason"] == "record 0: 2 <image> token(s) for 1 image(s)"
    assert "case003" not in _lines(out / "done.txt")
    again = convert(_dicom(tree), FlakyTemplate(), out, progress=False, limit=8)  # the API is back
    assert again.converted == 1 and again.skipped["already_done"] == 7
    assert "case003" not in {json.loads(x)["case_id"] for x in _lines(out / "rejects.jsonl")}
    ids = [json.loads(x)["id"] for x in _lines(out / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 14


def test_shards_partition_the_cases(tree, tmp_path):
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError, match="--shard must be i/n"):
        parse_shard("4/4")
    assert in_shard("case000", (0, 1))
    done = []
    for i in range(3):
        s = convert(_dicom(tree), SlowTemplate(), tmp_path / f"s{i}", shard=(i, 3), progress=False)
        assert s.skipped["other_shard"] == 42 - len(_lines(tmp_path / f"s{i}" / "done.txt"))
        done += _lines(tmp_path / f"s{i}" / "done.txt")
    assert sorted(done) == sorted(set(done)) and len(done) == 42
    assert [in_shard(f"case{i:03d}", (1, 3)) for i in range(6)] == [
        int(__import__("hashlib").sha1(f"case{i:03d}".encode()).hexdigest()[:16], 16) % 3 == 1
        for i in range(6)
    ]


def test_cli_convert_and_missing_folder(tree, tmp_path, capsys):
    assert "template" in GENERATORS.names()
    rc = main(
        [
            "convert",
            "dicom",
            "--src",
            str(tree),
            "--out",
            str(tmp_path / "o"),
            "--limit",
            "3",
            "--no-progress",
            "--window",
            "lung",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "converted 3 cases into 6 records" in out
    assert len(_lines(tmp_path / "o" / "done.txt")) == 3
    rc = main(["convert", "dicom", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert rc == 2
    assert "is not a folder; expected a folder of DICOM files" in capsys.readouterr().err
    assert (
        main(["convert", "dicom", "--src", str(tree), "--out", str(tmp_path / "o3"), "--shard", "2/2"]) == 2
    )
    assert "--shard must be i/n" in capsys.readouterr().err
    assert (
        main(["convert", "dicom", "--src", str(tree), "--out", str(tmp_path / "o3"), "--window", "lungs"])
        == 2
    )
    assert "unknown window 'lungs'" in capsys.readouterr().err


def _views_converter(src):
    from cambrian_core.data.case import Case, ImageRef
    from cambrian_core.data.converter import Converter

    class Views(Converter):
        name = "views"

        def check_layout(self) -> None:
            pass

        def iter_cases(self):
            # "lesion7" has two views; "lesion7_1" is another case with one image
            refs = [ImageRef(str(src / "red.png")), ImageRef(str(src / "green.png"))]
            yield Case("views", "lesion7", refs, text={"caption": "red then green"})
            yield Case("views", "lesion7_1", [ImageRef(str(src / "blue.png"))], text={"caption": "blue"})

    return Views(str(src))


def test_an_unforeseen_image_error_is_an_image_reject_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image

    import cambrian_core.data.runner as runner
    from cambrian_core.registry import build

    src = tmp_path / "src"
    src.mkdir()
    for name in ("red", "green", "blue"):
        Image.new("RGB", (8, 8)).save(src / f"{name}.png")

    def broken(ref, **kwargs):
        raise TypeError("float() argument must be a string or a real number, not 'NoneType'")

    monkeypatch.setattr(runner, "load_image", broken)
    gen = build(GENERATORS, {"type": "template", "instruct": False, "dicom_qa": False})
    summary = convert(_views_converter(src), gen, tmp_path / "out", workers=1, progress=False)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert summary.rejected == {"image": 2} and not any(r.get("retry") for r in rejects)
    assert rejects[0]["reason"].startswith(str(src / "red.png") + ": TypeError: float() argument")


def test_views_of_a_case_never_overwrite_another_cases_image(tmp_path):
    import numpy as np
    from PIL import Image

    from cambrian_core.registry import build

    src = tmp_path / "src"
    src.mkdir()
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        Image.new("RGB", (64, 64), rgb).save(src / f"{name}.png")

    gen = build(GENERATORS, {"type": "template", "instruct": False, "dicom_qa": False})
    convert(_views_converter(src), gen, tmp_path / "out", progress=False)
    seen = {}
    for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines():
        rec = json.loads(line)
        images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
        seen[rec["conversations"][1]["value"]] = [
            tuple(int(v) for v in np.asarray(Image.open(tmp_path / "out" / p))[0, 0]) for p in images
        ]
    assert seen == {"red then green": [colours["red"], colours["green"]], "blue": [colours["blue"]]}


def test_files_named_by_their_instance_uid_stay_separate_cases(tmp_path):
    import numpy as np
    from convert_helpers import write_ct

    src = tmp_path / "src"
    src.mkdir()
    uids = [f"1.2.826.0.1.3680043.8.498.{k}" for k in (101, 102, 103)]  # PACS exports: no extension
    hu = np.random.default_rng(0).integers(-1000, 1000, (48, 48)).astype(np.int16)
    for uid in uids:
        write_ct(src / uid, hu)
    write_ct(src / "named.DCM", hu)
    assert sorted(c.case_id for c in _dicom(src).iter_cases()) == sorted([*uids, "named"])
    summary = convert(_dicom(src), SlowTemplate(), tmp_path / "out", progress=False)
    assert summary.converted == 4 and not summary.skipped
