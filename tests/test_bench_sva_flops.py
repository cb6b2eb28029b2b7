"""The SVA benchmark's analytic FLOP count agrees with what the connector's matrix products execute."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cambrian_core import CONNECTORS, build

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sva.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_sva", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick():
    """The benchmark module, its quick-shape connector and inputs, and the FLOPs torch counts in its forward."""
    bench = _bench_module()
    cfg = bench.SHAPES["quick"]
    torch.manual_seed(0)
    model = build(CONNECTORS, {"type": "sva", **cfg})
    feats = [torch.randn(1, n, h) for n, h in zip(cfg["in_token_lens"], cfg["in_channels"], strict=True)]
    with FlopCounterMode(display=False) as counter:
        model(feats)
    return bench, cfg, model, feats, counter.get_total_flops()


def test_analytic_forward_flops_match_the_counted_matrix_products(quick):
    bench, cfg, _, _, counted = quick
    flops = bench.sva_flops(cfg)
    # the count leaves out only the off-diagonal work of the p . pos GEMM and the position embeddings'
    # own projections (a few percent at this shape), never more than it counts
    assert flops["executed"] <= counted <= 1.03 * flops["executed"]
    # the reference algorithm (every cell projects its shared query and all its keys) needs ~1.6x more
    assert 1.4 * counted < flops["reference"]
    assert 0 < flops["frozen_input"] < flops["executed"]


def test_floor_replays_every_matrix_product_and_weight_cast_of_the_forward(quick):
    bench, _, model, feats, counted = quick
    floor = bench.forward_floor(lambda: model(feats), model, repeats=1)
    # the flop counter sees the same products (it does not count the few matrix-vector ones)
    assert counted <= floor.gemm_flops <= 1.01 * counted
    assert floor.gemm_calls > 50 and floor.gemm > 0
    assert floor.cast_calls == 0 and floor.cast == 0  # fp32: autocast casts nothing

    def low() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model([f.bfloat16() for f in feats]).tokens

    floor = bench.forward_floor(low, model, repeats=1)
    assert counted <= floor.gemm_flops <= 1.01 * counted
    # every Linear weight of the connector is cast once or more (shared-query layers reuse a few)
    linears = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert floor.cast_calls >= linears and floor.cast > 0


def test_analytic_flops_of_a_staged_tower_match_the_counted_products(quick):
    """``--tower-input staged``: the count follows the products of ``StagedTokens.project`` and the forward does
    what the token-matrix forward does, minus the first projection's work on the enlarged stages."""
    bench, cfg, model, _, counted_tokens = quick
    feats, leaves = bench.tower_inputs("quick", staged=True, dtype=torch.float32)
    assert len(leaves) == len(feats) - 1 + len(feats[-1].parts) == len(feats) + 2  # two stages merged
    with FlopCounterMode(display=False) as counter:
        model(feats)
    counted = counter.get_total_flops()
    flops = bench.sva_flops(cfg, stages=bench.STAGES["quick"])
    tokens = bench.sva_flops(cfg)
    # exactly the same uncounted remainder as the token-matrix forward (the p . pos GEMM's off-diagonal work)
    assert counted - flops["executed"] == counted_tokens - tokens["executed"] >= 0
    assert tokens["executed"] - flops["executed"] > 0.25 * tokens["executed"]  # a third at this shape
    assert flops["reference"] == bench.sva_flops(cfg)["reference"]
