"""End to end on a tiny set built from real DICOM headers (pydicom-data scans: modality, body part), where the
right answers are known: a perfect predictor scores 1.0 everywhere; generation resumes, shards and refuses mixed
settings; the real tiny model runs through the serving engine and writes every output; the training hook runs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from cambrian_core.eval.items import VQAItem
from cambrian_core.eval.loaders import load_benchmark
from cambrian_core.eval.pipeline import evaluate
from cambrian_core.eval.runner import (
    Answer,
    Request,
    RunMismatchError,
    parse_shard,
    read_predictions,
    run_generation,
)

sys.path.insert(0, str(Path(__file__).parent))

SCANS = ["explicit_VR-UN.dcm", "JPEG2000.dcm", "examples_overlay.dcm", "emri_small.dcm", "bad_sequence.dcm"]
OPTIONS = {"A": "CT", "B": "MR", "C": "NM", "D": "CR"}


def build_dicom_set(folder: Path) -> Path:
    """``test.jsonl``: four questions per scan, answered from its DICOM header."""
    from cambrian_core.assets import dicom_file
    from cambrian_core.data.medimage import dicom_header

    rows = []
    for k, name in enumerate(SCANS):
        path = dicom_file(name)
        head = dicom_header(path)
        modality, part = head["Modality"], head["BodyPartExamined"].lower()
        letter = next(key for key, v in OPTIONS.items() if v == modality)
        rows += [
            {
                "question_id": f"{k}-mod",
                "image": str(path),
                "question": "What imaging modality is this?",
                "answer": modality,
                "answer_type": "open",
                "question_type": "MODALITY",
            },
            {
                "question_id": f"{k}-ct",
                "image": str(path),
                "question": "Is this a CT scan?",
                "answer": "yes" if modality == "CT" else "no",
                "question_type": "MODALITY",
            },
            {
                "question_id": f"{k}-part",
                "image": str(path),
                "question": "Which body part was examined?",
                "answer": part,
                "answer_type": "open",
                "question_type": "ORGAN",
            },
            {
                "question_id": f"{k}-mc",
                "image": str(path),
                "question": "Which modality acquired this image?",
                "choices": OPTIONS,
                "answer_label": letter,
                "question_type": "MODALITY",
            },
        ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def dicom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dicom_set(tmp_path_factory.mktemp("dicom_vqa"))


class Oracle:
    """A perfect predictor stand-in: answers with the gold (the letter for multiple choice)."""

    name = "oracle"

    def __init__(self, fail_after: int | None = None) -> None:
        self.seen: list[str] = []
        self.fail_after = fail_after

    def predict(self, requests: Sequence[Request]) -> list[Answer]:
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise RuntimeError("killed")
        self.seen += [r.item.qid for r in requests]
        return [Answer(r.item.answer_label or r.item.answer) for r in requests]


class Trap(Oracle):
    """Says "nodule" where the gold is "no" and a wrong letter for multiple choice; perfect elsewhere."""

    def predict(self, requests: Sequence[Request]) -> list[Answer]:
        def say(it: VQAItem) -> str:
            if it.kind == "choice":
                return "A" if it.answer_label != "A" else "B"
            return "nodule seen" if it.answer == "no" else it.answer

        return [Answer(say(r.item)) for r in requests]


def test_dicom_set_answers_come_from_headers(dicom_set: Path) -> None:
    es = load_benchmark("jsonl", dicom_set)
    got = {it.qid: it.answer for it in es.items}
    assert got["0-mod"] == "CT" and got["0-part"] == "pancreas" and got["0-ct"] == "yes"
    assert got["1-mod"] == "NM" and got["1-part"] == "whole body" and got["1-mc"] == "NM"
    assert got["3-part"] == "head" and got["3-ct"] == "no"
    assert {it.kind for it in es.items} == {"open", "closed", "choice"} and len(es) == 20


def test_perfect_predictor_scores_one_everywhere(dicom_set: Path, tmp_path: Path) -> None:
    es = load_benchmark("jsonl", dicom_set)
    out = evaluate(es, Oracle, tmp_path, model="oracle", n_boot=100)
    assert out.status == "complete"
    assert set(out.metrics) == {
        "closed_accuracy",
        "open_recall",
        "open_exact_match",
        "open_f1",
        "open_bleu1",
        "choice_accuracy",
        "llava_med_closed",
        "llava_med_open_substring",
        "llava_med_open_recall",
        "pmc_vqa_choice",
    }
    for name, m in out.metrics.items():
        assert (m["value"], m["ci"]) == (1.0, [1.0, 1.0]), name
    assert out.metrics["closed_accuracy"]["n"] == 5 and out.metrics["open_f1"]["n"] == 10
    assert out.metrics["choice_accuracy"]["n"] == 5
    assert (tmp_path / "errors.jsonl").read_text() == ""  # nothing imperfect
    results = json.loads((tmp_path / "results.json").read_text())
    assert (
        results["model"] == "oracle"
        and results["prompt"] == "short.v1"
        and results["kinds"] == {"choice": 5, "closed": 5, "open": 10}
    )
    assert list(results["sources"]) == ["test.jsonl"] and len(results["sources"]["test.jsonl"]) == 64


def test_trap_predictor_strict_vs_compat_and_errors_file(dicom_set: Path, tmp_path: Path) -> None:
    es = load_benchmark("jsonl", dicom_set)
    out = evaluate(es, Trap, tmp_path, model="trap", n_boot=100, worst=3)
    m = out.metrics
    # 3 of 5 scans are not CT: the gold "no" is answered "nodule seen"
    assert m["closed_accuracy"]["value"] == pytest.approx(2 / 5)
    assert m["llava_med_closed"]["value"] == 1.0  # the substring check counts "no" inside "nodule"
    assert m["closed_accuracy"]["by"]["question_type"] == {"MODALITY": {"value": pytest.approx(0.4), "n": 5}}
    assert m["choice_accuracy"]["value"] == 0.0 and m["open_exact_match"]["value"] == 1.0
    assert m["closed_accuracy"]["ci"][0] < 0.4 < m["closed_accuracy"]["ci"][1]
    worst = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert len(worst) == 3 and all(
        w["scores"].get("closed_accuracy", w["scores"].get("choice_accuracy")) == 0 for w in worst
    )
    assert {w["qid"] for w in worst} <= {f"{k}-{s}" for k in range(5) for s in ("ct", "mc")}
    md = (tmp_path / "results.md").read_text()
    assert "| closed accuracy (strict) | 40.00 |" in md
    assert "LLaVA-Med-compatible (substring matching; only for comparison with published numbers)" in md
    assert "| closed accuracy (LLaVA-Med substring) | 100.00 |" in md
    assert "## By question type" in md and "| ORGAN |" in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_ids_and_repairs_a_cut_line(dicom_set: Path, tmp_path: Path) -> None:
    es = load_benchmark("jsonl", dicom_set)
    first = Oracle(fail_after=8)
    with pytest.raises(RuntimeError, match="killed"):
        run_generation(es, first, tmp_path, batch_size=4)
    path = tmp_path / "predictions.jsonl"
    assert len(read_predictions(tmp_path)) == 8
    with open(path, "a") as f:
        f.write('{"qid": "2-mod", "predic')  # killed mid-write
    second = Oracle()
    summary = run_generation(es, second, tmp_path, batch_size=4)
    assert second.seen == [it.qid for it in es.items[8:]]  # finished ids skipped, the cut one redone
    assert (summary.generated, summary.skipped) == (12, 8)
    lines = path.read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(line)["qid"] for line in lines)
    third = Oracle()
    assert run_generation(es, third, tmp_path).generated == 0 and third.seen == []


def test_generation_errors_are_retried(dicom_set: Path, tmp_path: Path) -> None:
    es = load_benchmark("jsonl", dicom_set)

    class Flaky(Oracle):
        def predict(self, requests: Sequence[Request]) -> list[Answer]:
            return [
                Answer(error="ImageLoadError: x") if r.item.qid == "1-mod" else Answer(r.item.answer)
                for r in requests
            ]

    summary = run_generation(es.limit(8), Flaky(), tmp_path, batch_size=8)
    assert summary.failed == 1 and summary.errors == ["1-mod: ImageLoadError: x"]
    retry = Oracle()
    run_generation(es.limit(8), retry, tmp_path)
    assert retry.seen == ["1-mod"]
    assert "error" not in read_predictions(tmp_path)["1-mod"]


def test_shards_and_pinned_settings(dicom_set: Path, tmp_path: Path) -> None:
    es = load_benchmark("jsonl", dicom_set)
    a = evaluate(es, Oracle, tmp_path, model="oracle", shard=parse_shard("0/2"), n_boot=10)
    assert a.status == "incomplete" and a.missing == 10 and a.generation.generated == 10
    assert (tmp_path / "predictions.shard-0-of-2.jsonl").is_file()
    b = evaluate(es, Oracle, tmp_path, model="oracle", shard=(1, 2), n_boot=10)
    assert b.status == "complete" and b.metrics["closed_accuracy"]["value"] == 1.0

    def no_model() -> Oracle:
        raise AssertionError("a rescore must not load the model")

    assert evaluate(es, no_model, tmp_path, model="oracle", n_boot=10).status == "complete"
    with pytest.raises(RunMismatchError, match=r"prompt: 'short.v1' -> 'plain.v1'"):
        evaluate(es, Oracle, tmp_path, model="oracle", prompt_style="plain")
    with pytest.raises(RunMismatchError, match="model: 'oracle' -> 'other'"):
        evaluate(es, Oracle, tmp_path, model="other")
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


# ------------------------------------------------------------------------------------- the real tiny model
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from serve_helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def eval_argv(data: Path, model: str, out: Path, limit: str, *extra: str) -> list[str]:
    """``cambrian eval jsonl`` over ``data`` with ``model`` into ``out``, the first ``limit`` items."""
    return [
        "eval",
        "jsonl",
        "--data",
        str(data),
        "--model",
        model,
        "--out",
        str(out),
        "--limit",
        limit,
        *extra,
    ]


def test_cli_with_the_tiny_model_writes_every_output(
    dicom_set: Path, tiny_model_dir: str, tmp_path: Path, capsys
) -> None:
    from cambrian_core.cli import main

    out = tmp_path / "res"
    argv = eval_argv(dicom_set, tiny_model_dir, out, "8", "--batch-size", "4", "--max-new-tokens", "3")
    argv += ["--bootstrap", "50", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "generated 8, failed 0" in printed and "closed accuracy (strict)" in printed
    for name in (
        "results.json",
        "results.md",
        "results.png",
        "errors.jsonl",
        "predictions.jsonl",
        "run.json",
    ):
        assert (out / name).is_file(), name
    preds = read_predictions(out)
    assert len(preds) == 8 and all(
        r["completion_tokens"] >= 1 and r["prompt_tokens"] > 0 for r in preds.values()
    )
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == tiny_model_dir and results["generation"]["max_new_tokens"] == 3
    assert results["metrics"]["closed_accuracy"]["n"] == 2 and results["metrics"]["choice_accuracy"]["n"] == 2
    assert main(argv) == 0  # resumed: nothing left to generate
    assert "generated" not in capsys.readouterr().out
    assert main([*argv[:-1], "--max-new-tokens", "5"]) == 2
    assert "holds predictions made with other settings" in capsys.readouterr().err


def test_training_hook(dicom_set: Path, tiny_model_dir: str, tmp_path: Path) -> None:
    from cambrian_core.eval.hook import EvalHook
    from cambrian_core.model.io import load_model

    model = load_model(tiny_model_dir).train()
    logged = []

    class Logger:
        def log(self, step, values, split="train"):
            logged.append((step, split, dict(values)))

    hook = EvalHook("jsonl", dicom_set, limit=4, batch_size=4, max_new_tokens=2, out_dir=tmp_path)
    values = hook(model, step=3, logger=Logger())
    assert model.training  # the model comes back in training mode
    assert (
        set(values) >= {"jsonl/closed_accuracy", "jsonl/open_f1", "jsonl/failed"}
        and values["jsonl/failed"] == 0
    )
    assert all(0.0 <= v <= 1.0 for k, v in values.items() if k != "jsonl/failed")
    assert logged == [(3, "vqa", values)]
    assert json.loads((tmp_path / "step-3" / "results.json").read_text())["model"] == "training step 3"


@pytest.mark.slow
def test_the_demo_model_answers_the_dicom_set_and_is_scored_against_the_headers(
    dicom_set: Path, tmp_path: Path, capsys
) -> None:
    """``cambrian eval`` with the registered demo model (real SmolLM2-135M, real EfficientNet-Lite0) by name."""
    from cambrian_core.cli import main
    from cambrian_core.eval.metrics import closed_correct, token_f1
    from cambrian_core.model.checkpoints import get_checkpoint

    ok, why = get_checkpoint("cambrian-tiny-med").availability()
    if not ok:
        pytest.skip(why)
    out = tmp_path / "res"
    argv = ["eval", "jsonl", "--data", str(dicom_set), "--model", "cambrian-tiny-med", "--out", str(out)]
    argv += ["--batch-size", "10", "--max-new-tokens", "8", "--bootstrap", "50", "--device", "cpu"]
    assert main([*argv, "--no-progress"]) == 0
    assert "generated 20, failed 0" in capsys.readouterr().out
    preds = read_predictions(out)
    items = {it.qid: it for it in load_benchmark("jsonl", dicom_set).items}
    assert set(preds) == set(items) and all(p["completion_tokens"] >= 1 for p in preds.values())
    assert len({p["prediction"] for p in preds.values()}) > 1  # a real LLM: not one canned reply
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "cambrian-tiny-med"
    # the reported scores are the predictions' scores against the answers taken from the DICOM headers
    closed = [
        closed_correct(preds[q]["prediction"], it.answer, it.question)
        for q, it in items.items()
        if it.kind == "closed"
    ]
    f1 = [token_f1(preds[q]["prediction"], it.answer) for q, it in items.items() if it.kind == "open"]
    metrics = results["metrics"]
    assert metrics["closed_accuracy"]["n"] == len(closed) == 5
    assert metrics["closed_accuracy"]["value"] == pytest.approx(sum(closed) / len(closed))
    assert metrics["open_f1"]["value"] == pytest.approx(sum(f1) / len(f1))
    lo, hi = metrics["open_f1"]["ci"]
    assert lo <= metrics["open_f1"]["value"] <= hi


def test_cli_pins_dtype_quantisation_towers_and_weights(
    dicom_set: Path, tiny_model_dir: str, tmp_path: Path, capsys
) -> None:
    import os
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    out = tmp_path / "res"
    argv = eval_argv(dicom_set, str(model), out, "2")
    argv += ["--max-new-tokens", "2", "--bootstrap", "10", "--device", "cpu", "--no-progress"]
    from cambrian_core.cli import main

    assert main([*argv, "--dtype", "float32"]) == 0
    pinned = json.loads((out / "run.json").read_text())
    assert pinned["dtype"] == "float32" and pinned["quantize"] == "none" and pinned["tower_paths"] == {}
    assert pinned["weights"].startswith("1 file, ") and "bytes, newest" in pinned["weights"]
    assert json.loads((out / "results.json").read_text())["model_settings"]["dtype"] == "float32"
    capsys.readouterr()
    for extra, shown in [
        (["--dtype", "bfloat16"], "dtype: 'float32' -> 'bfloat16'"),
        (["--dtype", "float32", "--load-4bit"], "quantize: 'none' -> '4bit'"),
        (["--dtype", "float32", "--tower-path", f"siglip={tmp_path}"], "tower_paths: {} -> {'siglip': "),
    ]:
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert shown in err and "use another --out folder (or delete this one)" in err, err
    # the checkpoint saved again over the folder: its old answers are not the new weights' answers
    weights = next(model.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert main([*argv, "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "weights: '1 file, " in err and "the model's weight files changed since those answers" in err
    # a run.json written before these fields were pinned still resumes
    old = {k: v for k, v in pinned.items() if k not in ("dtype", "quantize", "tower_paths", "weights")}
    (out / "run.json").write_text(json.dumps(old))
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert "generated" not in capsys.readouterr().out


def test_weights_fingerprint(tmp_path: Path) -> None:
    from cambrian_core.eval.runner import weights_fingerprint

    assert weights_fingerprint("cambrian-tiny-med") is None  # a registered name: pinned by name
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "config.json").write_text("{}")  # not weights
    first = weights_fingerprint(tmp_path)
    assert first is not None and first.startswith("1 file, 10 bytes, newest ")
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert weights_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"y" * 11)
    assert weights_fingerprint(tmp_path).startswith("1 file, 11 bytes")
    tower = tmp_path / "tower.bin"
    assert weights_fingerprint(tmp_path, tower) == weights_fingerprint(tmp_path)  # missing: nothing added
    tower.write_bytes(b"t")
    assert weights_fingerprint(tmp_path, tower).startswith("3 files, 13 bytes")  # the folder holds it too


def test_a_misspelt_metric_fails_before_the_model_loads(dicom_set: Path, tmp_path: Path) -> None:
    es = load_benchmark("jsonl", dicom_set)

    def no_model() -> Oracle:
        raise AssertionError("the model must not load when a metric name is wrong")

    from cambrian_core.registry import BuildError

    with pytest.raises(BuildError, match="Did you mean `closed_accuracy`"):
        evaluate(es, no_model, tmp_path / "out", model="m", metrics=["closed_acc"])
    assert not (tmp_path / "out").exists()  # nothing pinned or generated


def test_training_hook_generates_in_eval_mode(
    dicom_set: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cambrian_core.eval.hook import EvalHook
    from cambrian_core.eval.runner import EnginePredictor
    from cambrian_core.model.io import load_model

    model = load_model(tiny_model_dir).train()
    modes = []
    predict = EnginePredictor.predict

    def spy(self: EnginePredictor, requests: Sequence[Request]) -> list[Answer]:
        modes.append(model.training)
        return predict(self, requests)

    monkeypatch.setattr(EnginePredictor, "predict", spy)
    EvalHook("jsonl", dicom_set, limit=2, batch_size=2, max_new_tokens=2)(model, step=1)
    assert modes == [False] and model.training  # eval mode while answering, training mode restored
    model.eval()
    EvalHook("jsonl", dicom_set, limit=2, batch_size=2, max_new_tokens=2)(model, step=2)
    assert not model.training
