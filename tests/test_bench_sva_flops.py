"""The SVA benchmark's analytic FLOP count agrees with what the connector's matrix products execute."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cambrian_core import CONNECTORS, build

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sva.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_sva", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_analytic_forward_flops_match_the_counted_matrix_products():
    bench = _bench_module()
    cfg = bench.SHAPES["quick"]
    torch.manual_seed(0)
    model = build(CONNECTORS, {"type": "sva", **cfg})
    feats = [torch.randn(1, n, h) for n, h in zip(cfg["in_token_lens"], cfg["in_channels"], strict=True)]
    with FlopCounterMode(display=False) as counter:
        model(feats)
    counted = counter.get_total_flops()
    flops = bench.sva_flops(cfg)
    # the count leaves out only the off-diagonal work of the p . pos GEMM and the position embeddings'
    # own projections (a few percent at this shape), never more than it counts
    assert flops["executed"] <= counted <= 1.03 * flops["executed"]
    # the reference algorithm (every cell projects its shared query and all its keys) needs ~1.6x more
    assert 1.4 * counted < flops["reference"]
    assert 0 < flops["frozen_input"] < flops["executed"]
