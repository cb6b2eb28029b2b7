"""``cambrian infer`` (streamed answer, JSONL batch with resume) and the serving commands' parsers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from serve_helpers import ct_small, png_bytes, save_tiny_model

from cambrian_core.cli import build_parser, main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "tiny-c", seed=3)


@pytest.fixture(scope="module")
def engine(folder):
    from cambrian_core.model.io import load_model
    from cambrian_core.serve.engine import InferenceEngine

    eng = InferenceEngine(load_model(folder), name="tiny-c")
    yield eng
    eng.shutdown()


def test_infer_streams_the_answer_about_a_dicom(folder, engine, capsys):
    from cambrian_core.serve.ui import render_scan

    rc = main(
        [
            "infer",
            "--model",
            folder,
            "--image",
            ct_small(),
            "--prompt",
            "What is in the image?",
            "--window",
            "abdomen",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    expected = engine.generate(
        "What is in the image?", [render_scan(ct_small(), "abdomen")], max_new_tokens=12
    )
    assert capsys.readouterr().out == expected.text + "\n"


def test_infer_streams_to_the_terminal_as_tokens_arrive(engine, monkeypatch):
    import argparse
    import io

    from cambrian_core.cli import infer_cmd

    writes = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    args = argparse.Namespace(max_new_tokens=16, temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    rc, text = infer_cmd._answer(
        engine, [{"role": "user", "content": "Describe the findings."}], [], args, Recorder()
    )
    assert rc == 0 and "".join(writes) == text + "\n" and len(writes) > 3


def test_batch_writes_one_result_per_line_and_resumes(folder, engine, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png_bytes(seed=1))
    lines = [
        {"id": "q1", "image": "a.png", "prompt": "What is in the image?", "max_new_tokens": 6},
        {"id": "q2", "image": ct_small(), "prompt": "Which organ?", "window": "lung", "max_new_tokens": 6},
        {"prompt": "No image here.", "max_new_tokens": 6},
        {"id": "bad", "image": "missing.png", "prompt": "?"},
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "results.jsonl"
    rc = main(["infer", "--model", folder, "--batch", str(batch), "--output", str(out), "--device", "cpu"])
    assert rc == 1  # two lines had errors, the others were answered
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"q1", "q2", "line-3", "bad", "line-5"}
    assert "does not exist" in rows["bad"]["error"] and "line 5" in rows["line-5"]["error"]
    from cambrian_core.serve.ui import render_scan

    q2 = engine.generate("Which organ?", [render_scan(ct_small(), "lung")], max_new_tokens=6)
    assert rows["q2"]["answer"] == q2.text and rows["q2"]["completion_tokens"] == q2.completion_tokens
    # a crash mid-write leaves a cut-off line; the rerun drops it and answers only what is missing
    kept = [line for line in out.read_text().splitlines() if json.loads(line)["id"] != "q1"]
    out.write_text("\n".join(kept) + '\n{"id": "q1", "ans')
    capsys.readouterr()
    main(["infer", "--model", folder, "--batch", str(batch), "--output", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    # failed lines are tried again (an out-of-memory error need not be final): 2 answered, 3 to go
    assert "retrying 2 line(s) that failed last time" in err and "2 already answered" in err
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in again) == sorted(rows) and len(again) == 5  # one line per id
    assert next(r for r in again if r["id"] == "q1")["answer"] == rows["q1"]["answer"]
    (tmp_path / "missing.png").write_bytes(png_bytes(seed=2))  # the user fixes the bad line
    main(["infer", "--model", folder, "--batch", str(batch), "--output", str(out), "--device", "cpu"])
    final = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(final) == 5 and "answer" in final["bad"] and "error" in final["line-5"]


def test_infer_reports_bad_input_clearly(folder, tmp_path, capsys):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    assert main(["infer", "--model", folder, "--image", str(notes), "--prompt", "hi", "--device", "cpu"]) == 2
    assert "is not an image" in capsys.readouterr().err
    assert main(["infer", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "neither a saved model folder nor a registered checkpoint" in capsys.readouterr().err
    assert main(["infer", "--model", folder, "--prompt", "hi", "--device", "tpu"]) == 2
    assert "--device 'tpu' is unknown" in capsys.readouterr().err
    png = tmp_path / "scan.png"
    Image.new("RGB", (8, 8)).save(png)
    argv = ["infer", "--model", folder, "--image", str(png), "--prompt", "hi", "--window", "lungz"]
    assert main(argv) == 2  # a PNG ignores windows, but a misspelled one is still a mistake
    assert "window 'lungz'" in capsys.readouterr().err


def test_serving_commands_take_the_seed_flags():
    parser = build_parser()
    w = parser.parse_args(
        [
            "serve",
            "worker",
            "--controller",
            "http://c:1",
            "--port",
            "5",
            "--worker",
            "http://w:5",
            "--model",
            "m",
            "--device",
            "cpu",
        ]
    )
    assert (w.controller_address, w.worker_address, w.model_path, w.port, w.host) == (
        "http://c:1",
        "http://w:5",
        "m",
        5,
        "127.0.0.1",
    )
    w2 = parser.parse_args(["serve", "worker", "--model-path", "m", "--controller-address", "http://c:1"])
    assert w2.model_path == "m" and w2.controller_address == "http://c:1"
    c = parser.parse_args(["serve", "controller", "--port", "10000", "--heart-beat-expiration", "2"])
    assert (c.host, c.port, c.heart_beat_expiration, c.dispatch_method) == (
        "127.0.0.1",
        10000,
        2.0,
        "shortest_queue",
    )
    web = parser.parse_args(["serve", "web", "--controller", "http://c:1", "--model-list-mode", "reload"])
    assert (web.controller_url, web.model_list_mode, web.host) == ("http://c:1", "reload", "127.0.0.1")
    api = parser.parse_args(["serve", "api", "--model", "m", "--api-key", "k", "--allow-local-files"])
    assert (api.host, api.port, api.api_key, api.allow_local_files) == ("127.0.0.1", 8000, "k", True)
    demo = parser.parse_args(["demo", "--model", "m"])
    assert (demo.host, demo.model) == ("127.0.0.1", "m")


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["serve", "worker", "--model", "m"], "--heart-beat-interval"),
        (["serve", "controller"], "--heart-beat-expiration"),
        (["serve", "controller"], "--worker-timeout"),
        (["serve", "controller"], "--max-body-mb"),
    ],
)
def test_timings_and_sizes_must_be_positive(command, flag, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, flag, "0"])
    assert info.value.code == 2
    assert f"argument {flag}: must be > 0, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["serve", "controller"], ["serve", "web"], ["serve", "api", "--model", "m"], ["demo"]]
)
def test_a_port_out_of_range_is_an_argument_error(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--port", "99999"])
    assert info.value.code == 2
    assert "argument --port: 99999 is not a port number (0-65535)" in capsys.readouterr().err


def test_python_dash_m_entry_points_parse_the_seed_lines(monkeypatch):
    import argparse

    from cambrian_core.serve import controller, gradio_web_server, model_worker

    seen = {}
    for mod in (controller, model_worker, gradio_web_server):
        monkeypatch.setattr(mod, "run", lambda args, m=mod: seen.setdefault(m.__name__, args) and 0)
    controller.main(["--host", "0.0.0.0", "--port", "10000"])
    model_worker.main(
        [
            "--host",
            "0.0.0.0",
            "--controller",
            "http://localhost:10000",
            "--port",
            "40000",
            "--worker",
            "http://localhost:40000",
            "--model-path",
            "cambrian-tiny-med",
        ]
    )
    gradio_web_server.main(["--controller", "http://localhost:10000", "--model-list-mode", "reload"])
    assert seen["cambrian_core.serve.controller"].port == 10000
    args = seen["cambrian_core.serve.model_worker"]
    assert isinstance(args, argparse.Namespace) and args.model_path == "cambrian-tiny-med"
    assert seen["cambrian_core.serve.gradio_web_server"].model_list_mode == "reload"


def test_loading_names_devices_and_cambrian1_folders(tmp_path, monkeypatch):
    from cambrian_core.serve.loading import is_cambrian1_folder, model_display_name, pick_device, pick_dtype

    assert pick_device("cpu") == "cpu" and pick_dtype("auto", "cpu") is None
    with pytest.raises(ValueError, match="unknown"):
        pick_dtype("float8", "cpu")
    ckpt = tmp_path / "run1" / "checkpoint-300"
    ckpt.mkdir(parents=True)
    assert model_display_name(str(ckpt)) == "run1_checkpoint-300" and model_display_name(
        "cambrian-tiny-med"
    ) == ("cambrian-tiny-med")
    assert model_display_name(str(ckpt) + "/") == "run1_checkpoint-300"
    model = tmp_path / "chest-model"
    model.mkdir()
    monkeypatch.chdir(model)
    assert model_display_name(".") == model_display_name("./") == "chest-model"  # never ""
    monkeypatch.chdir(ckpt)
    assert model_display_name(".") == "run1_checkpoint-300"
    (ckpt / "config.json").write_text(
        json.dumps({"architectures": ["CambrianLlamaForCausalLM"], "mm_vision_tower_aux_list": ["siglip/x"]})
    )
    assert is_cambrian1_folder(ckpt)


def test_a_cambrian1_folder_without_tower_weights_names_the_flag(tmp_path):
    pytest.importorskip("cambrian_core.export.cambrian1")
    from cambrian_core.serve.loading import load_for_serving, parse_tower_paths

    src = tmp_path / "cambrian-8b"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["CambrianLlamaForCausalLM"],
                "mm_vision_tower_aux_list": ["openai/clip-vit-large-patch14-336"],
            }
        )
    )
    with pytest.raises(ValueError, match="--tower-path NAME=DIR"):
        load_for_serving(str(src), "cpu")
    assert parse_tower_paths(["a/b=/x/y", "c=d"]) == {"a/b": "/x/y", "c": "d"}
    with pytest.raises(ValueError, match="expected NAME=DIR"):
        parse_tower_paths(["/x/y"])


def test_interactive_chat_keeps_the_history(folder, engine, monkeypatch, capsys):
    answers = iter(["What is in the image?", "Is there a fracture?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert (
        main(
            [
                "infer",
                "--model",
                folder,
                "--image",
                ct_small(),
                "--window",
                "abdomen",
                "--max-new-tokens",
                "6",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    from cambrian_core.serve.ui import render_scan

    scan = render_scan(ct_small(), "abdomen")
    first = engine.generate("What is in the image?", [scan], max_new_tokens=6).text
    convo = [
        {"role": "user", "content": "<image>\nWhat is in the image?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Is there a fracture?"},
    ]
    second = engine.generate(convo, [scan], max_new_tokens=6).text
    assert out == f"ASSISTANT: {first}\nASSISTANT: {second}\n"


def test_a_cambrian1_folder_is_imported_on_the_fly_and_served(tmp_path, monkeypatch, capsys):
    pytest.importorskip("cambrian_core.export.cambrian1")
    import export_helpers as H
    from serve_helpers import image

    from cambrian_core.serve.engine import InferenceEngine, SamplingParams
    from cambrian_core.serve.loading import load_for_serving

    monkeypatch.setenv("CAMBRIAN_CACHE", str(tmp_path / "cache"))
    names = [H.CLIP_NAME, H.SIGLIP_NAME]
    original = H.make(H.sva_config())
    towers = H.save_towers(original, tmp_path)
    src = H.write_cambrian1(original, tmp_path / "cambrian-8b-tiny", names)
    flags = [f"{n}={p}" for n, p in zip(names, towers, strict=True)]
    imported = load_for_serving(str(src), "cpu", tower_paths=flags)
    assert len(list((tmp_path / "cache" / "imported").iterdir())) == 1  # converted once, into the cache
    a, b = InferenceEngine(original, name="a"), InferenceEngine(imported, name="b")
    try:
        # the import renders prompts the Cambrian-1 way, so compare on the same token ids
        ids = a.tokenize_messages([{"role": "user", "content": "<image>\nWhat is in the image?"}], 1)
        params = SamplingParams(max_new_tokens=8, min_tokens=8)
        ra = a.submit(ids, [image(seed=7)], params).wait(60)
        rb = b.submit(ids, [image(seed=7)], params).wait(60)
        assert ra.text == rb.text and rb.completion_tokens == 8
        expected = b.generate("What is in the image?", max_new_tokens=8).text
    finally:
        a.shutdown()
        b.shutdown()
    args = [
        "infer",
        "--model",
        str(src),
        "--prompt",
        "What is in the image?",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]
    assert main([*args, *[x for f in flags for x in ("--tower-path", f)]]) == 0  # the cached import is reused
    assert capsys.readouterr().out.endswith(expected + "\n")  # after any library log lines
    assert len(list((tmp_path / "cache" / "imported").iterdir())) == 1  # reused, not imported again
    # new weights written into the same folder are imported again, not served from the stale import
    import shutil

    shutil.rmtree(src)
    retrained = H.make(H.sva_config(), seed=1)
    H.write_cambrian1(retrained, src, names)
    again = load_for_serving(str(src), "cpu", tower_paths=flags)
    assert torch.equal(again.image_newline, retrained.image_newline)
    assert not torch.equal(again.image_newline, original.image_newline)
    assert len(list((tmp_path / "cache" / "imported").iterdir())) == 2
