"""``--load-8bit`` / ``--load-4bit``: the LLM's decoder layers in bitsandbytes int8 / NF4, everything else as saved."""

from __future__ import annotations

import sys

import bitsandbytes as bnb
import export_helpers as H
import pytest
import torch
from serve_helpers import image, save_tiny_model

from cambrian_core.cli import build_parser, main
from cambrian_core.model.quantize import quantize_linears
from cambrian_core.serve.loading import load_for_serving

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
#: bits -> (bnb layer, stored weight dtype, bytes per fp32 weight byte, largest relative logit error)
FORMATS = {
    8: (bnb.nn.Linear8bitLt, torch.int8, 1 / 4, 0.03),
    4: (bnb.nn.Linear4bit, torch.uint8, 1 / 8, 0.25),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("quant") / "tiny-q", seed=3)


def _linears(module: torch.nn.Module, kind: type) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if type(m) is kind}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
def test_only_the_decoder_linears_are_quantized_and_the_logits_stay_close(folder, bits, device):
    layer, stored, ratio, tolerance = FORMATS[bits]
    plain = load_for_serving(folder, device, "float32")
    quant = load_for_serving(folder, device, "float32", quantize=bits)
    before = _linears(plain.llm, torch.nn.Linear)
    after = _linears(quant.llm, layer)
    assert set(after) == {n for n in before if not n.endswith("lm_head")} and len(after) > 4
    assert set(_linears(quant.llm, torch.nn.Linear)) == {n for n in before if n.endswith("lm_head")}
    for name, q in after.items():
        assert q.weight.dtype == stored and q.weight.device.type == device
        full = before[name].weight
        assert q.weight.numel() * q.weight.element_size() == full.numel() * full.element_size() * ratio
    # towers, connector, embeddings, norms and the LM head are the plain model's, bit for bit
    kept = {k: v for k, v in plain.state_dict().items() if not any(k.startswith(f"llm.{n}.") for n in after)}
    got = quant.state_dict()
    assert all(torch.equal(got[k], v) for k, v in kept.items())
    batch = H.inputs(plain)
    batch = {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in batch.items()}
    want, have = H.logits(plain, batch).float(), H.logits(quant, batch).float()
    error = ((have - want).norm() / want.norm()).item()
    assert 0 < error < tolerance


def test_infer_load_4bit_answers_like_the_quantized_engine(folder, capsys):
    from cambrian_core.serve.engine import InferenceEngine

    engine = InferenceEngine(load_for_serving(folder, "cpu", quantize=4), name="q")
    try:
        want = engine.generate("What is in the image?", [image(seed=4)], max_new_tokens=8).text
    finally:
        engine.shutdown()
    png = folder + "/../q.png"
    image(seed=4).save(png)
    argv = ["infer", "--model", folder, "--image", png, "--prompt", "What is in the image?"]
    assert main([*argv, "--max-new-tokens", "8", "--device", "cpu", "--load-4bit"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_the_two_flags_exclude_each_other_and_reach_every_loader(capsys):
    parser = build_parser()
    for argv in (
        ["infer", "--model", "m", "--prompt", "hi"],
        ["serve", "api", "--model", "m"],
        ["serve", "worker", "--model", "m"],
        ["demo", "--model", "m"],
        ["eval", "vqa_rad", "--model", "m", "--data", "d"],
    ):
        assert parser.parse_args(argv).quantize is None
        assert parser.parse_args([*argv, "--load-8bit"]).quantize == 8
        assert parser.parse_args([*argv, "--load-4bit"]).quantize == 4
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["infer", "--model", "m", "--load-8bit", "--load-4bit"])
    assert exc.value.code == 2
    assert "argument --load-4bit: not allowed with argument --load-8bit" in capsys.readouterr().err


def test_the_seed_worker_command_takes_load_4bit(monkeypatch):
    from cambrian_core.serve import model_worker

    seen = {}
    monkeypatch.setattr(model_worker, "run", lambda args: seen.setdefault("quantize", args.quantize) and 0)
    model_worker.main(["--model-path", "m", "--load-4bit", "--no-register"])
    assert seen == {"quantize": 4}


def test_without_bitsandbytes_the_flag_says_how_to_install_it(folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    argv = ["infer", "--model", folder, "--prompt", "hi", "--device", "cpu", "--load-8bit"]
    assert main(argv) == 2
    assert "--load-8bit needs bitsandbytes: pip install 'cambrian[quant]'" in capsys.readouterr().err


def test_bits_other_than_8_or_4_are_refused(folder):
    with pytest.raises(ValueError, match=r"quantize must be 8 or 4 \(--load-8bit / --load-4bit\), got 2"):
        load_for_serving(folder, "cpu", quantize=2)
    with pytest.raises(ValueError, match=r"bits must be one of \(8, 4\), got 3"):
        quantize_linears(torch.nn.Sequential(torch.nn.Linear(2, 2)), 3, torch.float32)  # type: ignore[arg-type]
