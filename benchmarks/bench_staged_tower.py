"""A multi-stage ConvNeXt tower into SVA: stages projected on their own grid vs the concatenated token matrix.

At the Cambrian-8B shape the ConvNeXt-XXL tower (1024 px) has stages of 384/768/1536/3072 channels on
256/128/64/32 grids, and SVA wants them on a 96x96 grid. The two larger stages are shrunk by the tower
either way (that is not timed). Then:

* ``tokens``: what a tower that returns one tensor does: enlarge the 64x64 and 32x32 stages, concatenate the
  9216 x 5760 token matrix, and run SVA on it (its first Linear projects 9216 x 5760 -> 1024);
* ``staged``: what the composed model does with SVA (``StagedTokens``): project those two stages on their own
  grids, enlarge the 1024-wide products, run the rest of SVA.

Both feed the same connector (the other three towers as in ``bench_sva.py``); forward and forward+backward
(connector trained, tower frozen, as in stage 1) are timed in the same run, best of ``--repeats``, and the
ratio tokens / staged is printed. The outputs agree to rounding (checked before timing).

Run:  python benchmarks/bench_staged_tower.py [--quick] [--dtype fp32|bf16|both] [--repeats N]
"""

from __future__ import annotations

import argparse
import math

import torch
from bench_sva import SHAPES, STAGES, add_common_args, best_of

from cambrian_core import CONNECTORS, build
from cambrian_core.cpu_allocator import tune_cpu_allocator
from cambrian_core.model.encoder import StagedTokens


def run(shape: str, dtype_name: str, repeats: int) -> None:
    cfg = SHAPES[shape]
    torch.manual_seed(0)
    model = build(CONNECTORS, {"type": "sva", **cfg})
    low = torch.bfloat16 if dtype_name == "bf16" else None
    dtype = low or torch.float32
    side = math.isqrt(cfg["in_token_lens"][-1])
    dims = zip(cfg["in_token_lens"][:-1], cfg["in_channels"][:-1], strict=True)
    others = [torch.randn(1, n, c, dtype=dtype) for n, c in dims]
    maps = [torch.randn(1, c, s, s, dtype=dtype) for c, s in STAGES[shape]]
    assert sum(c for c, _ in STAGES[shape]) == cfg["in_channels"][-1]
    staged = StagedTokens.from_maps(maps, side)  # the tower's part: the large stages shrunk to 96x96
    grad = torch.randn(1, cfg["token_len"], cfg["out_dim"], dtype=dtype)

    def forward(kind: str) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low is not None):
            tower = staged if kind == "staged" else staged.tokens()
            return model([*others, tower]).tokens

    def step(kind: str) -> None:
        model.zero_grad(set_to_none=True)
        forward(kind).backward(grad)

    with torch.no_grad():
        a, b = forward("tokens").float(), forward("staged").float()
    err = ((a - b).norm() / a.norm()).item()
    print(f"\n[{dtype_name}] relative difference of the two outputs: {err:.1e}")
    times = {}
    for what, fn in (("forward", forward), ("fwd+bwd (stage 1)", step)):
        for kind in ("tokens", "staged"):
            times[what, kind] = best_of(lambda fn=fn, kind=kind: fn(kind), repeats).wall
        t_tok, t_st = times[what, "tokens"], times[what, "staged"]
        print(
            f"  {what:<18} tokens {t_tok * 1e3:8.1f} ms   staged {t_st * 1e3:8.1f} ms   "
            f"tokens / staged {t_tok / t_st:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args()
    tune_cpu_allocator()
    shape = "quick" if args.quick else "cambrian-8b"
    print(f"staged ConvNeXt tower into SVA, shape {shape}: stages (channels, side) {STAGES[shape]}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]:
        run(shape, name, args.repeats)


if __name__ == "__main__":
    main()
