"""SVA connector speed at the Cambrian-8B connector shape, against a plain matmul measured in the same run.

Times the SVA forward and forward+backward (batch 1, C=1024, towers 1152/1024/1536/5760 wide at
576/576/576/9216 tokens -> window sides 1,1,1,4 on a 24x24 query grid, depth 3, LLM width 4096) in fp32
and in bf16 autocast; reports ms, achieved GFLOP/s from an analytic FLOP count and the ratio to the
GFLOP/s of a plain ``torch.mm`` of two 4096x4096 matrices in the same dtype.

Backward is timed twice: with the tower features frozen (stage 1: towers frozen, connector trained; the
row the fwd+bwd targets apply to) and with the features requiring grad (what a trainable tower would need,
shown for information: the gradient of the 9216x5760 tower projection alone makes its FLOPs 3.0x the
forward's).

The peaks are this host's: on CPUs with AMX the bf16 peak is ~6x the fp32 one, while the memory-bound work
around the GEMMs (LayerNorms, GELUs, window bookkeeping, autocast's weight casts) is not faster in bf16, so
"% of peak" figures from different hosts are not comparable.

The cambrian commands keep freed memory in the process heap (``cambrian_core.cpu_allocator``), so large
tensors are not page-faulted in on every allocation; ``--allocator system`` measures glibc's defaults.

Both variants are timed by default: eager PyTorch and the connector under ``torch.compile`` (what
``schedule.compile_connector`` trains with; the compilation happens in the untimed warm-up call).

Each dtype also gets a floor measured in the same run: every matrix product one forward dispatches (and, in
bf16, every cast of an fp32 weight autocast makes) is replayed alone on fresh operands of the same shapes,
strides and dtypes, best of ``--repeats``. With their operands hot in cache and nothing else running, their
sum is a practical lower bound for any forward doing this work on this host, so it bounds the efficiency the
targets ask about: where the bound is below a target, no reordering of the remaining (memory-bound) work can
meet it. The compiled variant is given the eager floor (inductor may fuse the casts into other kernels, but
still reads every fp32 weight, and computes the same products).

``--tower-input staged`` gives the ConvNeXt tower as the composed model hands it to SVA from a live tower
(``StagedTokens``: its 64x64 and 32x32 stages projected on their own grids, then enlarged; 67.7 GFLOP fewer);
the default is one 9216 x 5760 token matrix, what a feature cache holds. ``bench_staged_tower.py`` compares
the two paths directly.

Run:  python benchmarks/bench_sva.py [--quick] [--dtype fp32|bf16|both] [--repeats N] [--variants eager,compiled]
          [--tower-input tokens|staged] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from cambrian_core import CONNECTORS, build
from cambrian_core.cpu_allocator import ENV, tune_cpu_allocator
from cambrian_core.model.encoder import StagedTokens

SHAPES: dict[str, dict[str, Any]] = {
    "cambrian-8b": dict(
        in_channels=[1152, 1024, 1536, 5760],
        in_token_lens=[576, 576, 576, 9216],
        out_dim=4096,
        token_len=576,
        vision_hidden_size=1024,
        connector_depth=3,
        num_heads=16,
    ),
    "quick": dict(  # a quarter of the widths, half the grid sides
        in_channels=[288, 256, 384, 1440],
        in_token_lens=[144, 144, 144, 2304],
        out_dim=1024,
        token_len=144,
        vision_hidden_size=256,
        connector_depth=3,
        num_heads=16,
    ),
}

#: the ConvNeXt-XXL tower's stages (channels, grid side) behind the last tower of each shape, for
#: ``--tower-input staged`` (at 1024 px; the quick shape has quarter widths and half sides)
STAGES: dict[str, list[tuple[int, int]]] = {
    "cambrian-8b": [(384, 256), (768, 128), (1536, 64), (3072, 32)],
    "quick": [(96, 128), (192, 64), (384, 32), (768, 16)],
}

#: (forward efficiency vs peak, fwd+bwd / forward) targets per dtype
TARGETS = {"fp32": (0.85, 2.6), "bf16": (0.75, 3.0)}


def _first_projection(cfg: dict[str, Any], stages: list[tuple[int, int]] | None) -> int:
    """FLOPs of the towers' first Linear; ``stages``: the last tower comes staged (stages smaller than its grid
    projected on their own grid, see ``StagedTokens``)."""
    c = cfg["vision_hidden_size"]
    dims = list(zip(cfg["in_token_lens"], cfg["in_channels"], strict=True))
    if stages is None:
        return sum(2 * n * h * c for n, h in dims)
    n_last = dims[-1][0]
    last = sum(2 * min(side * side, n_last) * ch * c for ch, side in stages)
    return sum(2 * n * h * c for n, h in dims[:-1]) + last


def sva_flops(
    cfg: dict[str, Any], batch: int = 1, stages: list[tuple[int, int]] | None = None
) -> dict[str, float]:
    """Analytic multiply-add FLOPs (2 per MAC) of one SVA forward.

    ``executed``: what this implementation computes; ``reference``: the algorithm of reference §B.4 as
    written (every cell projects its shared query and every key, towers as one token matrix);
    ``frozen_input``: the part of the backward that is skipped when the tower features do not require grad
    (d/dx of the first Linear). ``stages``: the last tower is given staged (``--tower-input staged``).
    """
    c, out_dim, f2 = cfg["vision_hidden_size"], cfg["out_dim"], cfg["token_len"]
    heads, depth = cfg["num_heads"], cfg["connector_depth"]
    queries = cfg.get("query_num_list") or [f2]
    sides = [math.isqrt(n) for n in cfg["in_token_lens"]]
    second = sum(2 * n * c * c for n in cfg["in_token_lens"])
    executed = _first_projection(cfg, stages) + second
    reference = _first_projection(cfg, None) + second
    for qn in queries:
        q = math.isqrt(qn)
        keys = [(s // q) ** 2 for s in sides]
        for layer in range(depth):
            n = 1 if layer == 0 else qn  # first layer: one shared query per image
            executed += 4 * c * c + 4 * n * c * c  # context half of proj_in (+proj_context), X half, q_proj
            for r2 in keys:
                if r2 == 1 and n == 1:  # the shared query into key space, scores, v projection, weighting
                    executed += 2 * c * c + 2 * qn * c * heads + 2 * qn * c * c + qn * c
                elif r2 == 1:
                    executed += 4 * qn * c * c + 3 * qn * c  # k and v projections, scores, weighting
                else:  # query into key space, scores, window sums, value projection (the p.pos
                    # row dots ride on an R-times wider GEMM whose off-diagonal work is not counted)
                    executed += 2 * n * c * c + 2 * qn * r2 * c * heads
                    executed += 2 * qn * heads * r2 * c + 2 * qn * c * c
            executed += 6 * qn * c * c  # o_proj, MLP
            reference += 2 * qn * c * c + 4 * qn * c * c + 2 * qn * c * c  # proj_context, proj_in, q_proj
            reference += sum(4 * qn * r2 * c * c for r2 in keys) + 4 * qn * sum(keys) * c
            reference += 6 * qn * c * c
    head = 2 * f2 * (len(queries) * c * out_dim + out_dim * out_dim)
    executed += head
    reference += head
    frozen = _first_projection(cfg, stages)
    return {"executed": batch * executed, "reference": batch * reference, "frozen_input": batch * frozen}


class Timing(NamedTuple):
    """Best (minimum) seconds of a repeated call, by two clocks."""

    wall: float  #: wall-clock seconds
    cpu: float  #: process CPU seconds / threads (excludes time other processes held our cores)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_of(fn: Callable[[], Any], repeats: int) -> Timing:
    """Minimum wall-clock and CPU time of ``repeats`` calls after one warm-up call (CUDA work included)."""
    fn()
    _sync()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        _sync()
        wall.append(time.perf_counter() - w0)
        cpu.append((time.process_time() - c0) / torch.get_num_threads())
        del out  # freeing the result (and a forward's autograd graph) is not part of the timed call
    return Timing(min(wall), min(cpu))


def matmul_peak(dtype: torch.dtype, repeats: int, device: str = "cpu") -> Timing:
    """Seconds of a plain ``torch.mm`` of two 4096x4096 matrices (output preallocated)."""
    a, b = (torch.randn(4096, 4096, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty(4096, 4096, dtype=dtype, device=device)
    return best_of(lambda: torch.mm(a, b, out=out), repeats)


aten = torch.ops.aten
#: matrix products (by overload packet) and their FLOPs from the operands' shapes: torch's own formulas, plus the
#: matrix-vector products torch's flop counter leaves out
_GEMMS: dict[Any, Callable[..., int]] = {
    **{op: flop_registry[op] for op in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm)},
    aten.mv: lambda mat, vec: 2 * mat[0] * mat[1],
    aten.addmv: lambda acc, mat, vec: 2 * mat[0] * mat[1],
}


class Spec(NamedTuple):
    """Shape, strides and dtype of an operand, enough to replay an op on fresh data."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: str

    def make(self) -> torch.Tensor:
        """Random data with these strides (a base buffer as large as the strides reach)."""
        size = (
            1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride, strict=True))
            if all(self.shape)
            else 0
        )
        return torch.randn(size, device=self.device).to(self.dtype).as_strided(self.shape, self.stride)


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return Spec(tuple(x.shape), tuple(x.stride()), x.dtype, x.device.type)
    if isinstance(x, list | tuple):
        return tuple(_spec(v) for v in x)
    return x


class _Recorder(TorchDispatchMode):
    """Records the matrix products a call dispatches, and the casts of ``weights`` (by storage) to other dtypes."""

    def __init__(self, weights: set[int]) -> None:
        super().__init__()
        self.weights = weights
        self.ops: dict[tuple[Any, ...], int] = {}  # (op, args, kwargs as specs) -> times called

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        cast = (
            func is aten._to_copy.default
            and args[0].untyped_storage().data_ptr() in self.weights
            and out.dtype != args[0].dtype
        )
        if func.overloadpacket in _GEMMS or cast:
            key = (
                func,
                tuple(_spec(a) for a in args),
                tuple(sorted((k, _spec(v)) for k, v in kwargs.items())),
            )
            self.ops[key] = self.ops.get(key, 0) + 1
        return out


class Floor(NamedTuple):
    """Seconds the forward's matrix products and weight casts take when each is replayed alone."""

    gemm: float  #: all matrix products, each at its standalone speed
    gemm_flops: float  #: what they compute
    gemm_calls: int
    cast: float  #: autocast's casts of fp32 weights to the low dtype
    cast_calls: int


def forward_floor(forward: Callable[[], Any], model: torch.nn.Module, repeats: int) -> Floor:
    """Replay every matrix product and weight cast of one ``forward()`` alone (best of ``repeats``) and sum."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    recorder = _Recorder(weights)
    with recorder:
        forward()
    gemm = flops = cast = 0.0
    gemm_calls = cast_calls = 0
    for (func, arg_specs, kw_specs), count in recorder.ops.items():
        args = [a.make() if isinstance(a, Spec) else a for a in arg_specs]
        kwargs = {k: v.make() if isinstance(v, Spec) else v for k, v in kw_specs}
        seconds = best_of(lambda func=func, args=args, kwargs=kwargs: func(*args, **kwargs), repeats).wall
        if func.overloadpacket in _GEMMS:
            shapes = [a.shape for a in arg_specs if isinstance(a, Spec)]
            gemm += count * seconds
            flops += count * _GEMMS[func.overloadpacket](*shapes)
            gemm_calls += count
        else:
            cast += count * seconds
            cast_calls += count
    return Floor(gemm, flops, gemm_calls, cast, cast_calls)


def tower_inputs(
    shape: str, staged: bool, dtype: torch.dtype, device: str = "cpu"
) -> tuple[list[torch.Tensor | StagedTokens], list[torch.Tensor]]:
    """Random tower features for ``shape`` (the last tower as ``StagedTokens`` when ``staged``: stages larger
    than its grid already shrunk and merged by the tower, smaller ones on their own grid) and the leaf
    tensors."""
    cfg = SHAPES[shape]
    lens, widths = cfg["in_token_lens"], cfg["in_channels"]
    feats: list[torch.Tensor | StagedTokens] = [
        torch.randn(1, n, h, dtype=dtype, device=device) for n, h in zip(lens, widths, strict=True)
    ]
    leaves = list(feats)
    if staged:  # the stages as the tower hands them over (the shrinking is the tower's work, not timed)
        maps = [torch.randn(1, ch, s, s, dtype=dtype, device=device) for ch, s in STAGES[shape]]
        tower = StagedTokens.from_maps(maps, math.isqrt(lens[-1]))
        leaves = [*leaves[:-1], *tower.parts]
        feats[-1] = tower
    return feats, leaves


def run(
    shape: str,
    dtype_name: str,
    repeats: int,
    device: str = "cpu",
    compiled: bool = False,
    floor: Floor | None = None,
    staged: bool = False,
) -> dict[str, Any]:
    """Time forward and both forward+backward variants; print the table and the target verdicts."""
    cfg = SHAPES[shape]
    torch.manual_seed(0)
    model = build(CONNECTORS, {"type": "sva", **cfg}).to(device)
    flops = sva_flops(cfg, stages=STAGES[shape] if staged else None)
    low = torch.bfloat16 if dtype_name == "bf16" else None
    feat_dtype = low or torch.float32  # bf16 towers hand bf16 features to the connector
    feats, leaves = tower_inputs(shape, staged, feat_dtype, device)
    grad = torch.randn(1, cfg["token_len"], cfg["out_dim"], dtype=low or torch.float32, device=device)

    def forward() -> torch.Tensor:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=low is not None):
            return model(feats).tokens

    if floor is None:  # recorded eagerly (see the module docstring for the compiled variant)
        forward()
        floor = forward_floor(forward, model, repeats)
    if compiled:  # what CambrianModel.compile_connector / schedule.compile_connector do
        model.compile()

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        for f in leaves:
            f.grad = None
        forward().backward(grad)

    peak = matmul_peak(low or torch.float32, repeats + 1, device)
    fwd = best_of(forward, repeats)
    steps = {}
    for needs_grad in (False, True):
        for f in leaves:
            f.requires_grad_(needs_grad)
        steps[needs_grad] = best_of(train_step, repeats)
    peak_after = matmul_peak(low or torch.float32, repeats + 1, device)
    peak = Timing(min(peak.wall, peak_after.wall), min(peak.cpu, peak_after.cpu))

    eff_target, ratio_target = TARGETS[dtype_name]
    mm_flops = 2 * 4096**3
    step_flops = {g: 3 * flops["executed"] - (0 if g else flops["frozen_input"]) for g in (False, True)}
    ideal = {g: step_flops[g] / flops["executed"] for g in (False, True)}
    labels = {False: "fwd+bwd, features frozen (stage 1)", True: "fwd+bwd, features require grad"}
    result: dict[str, Any] = {}
    variant = "torch.compile" if compiled else "eager"
    print(f"\n[{dtype_name} on {device}, {variant}] forward executes {flops['executed'] / 1e9:.1f} GFLOP")
    for clock in ("wall", "cpu") if device == "cpu" else ("wall",):
        pk = mm_flops / getattr(peak, clock) / 1e9
        t_fwd = getattr(fwd, clock)
        eff = flops["executed"] / t_fwd / 1e9 / pk
        print(f"  clock: {clock}; plain torch.mm 4096x4096 peak {pk:.1f} GFLOP/s")
        print(f"    {'forward':<36} {t_fwd * 1e3:9.1f} ms {flops['executed'] / t_fwd / 1e9:8.1f} GFLOP/s")
        for g in (False, True):
            t = getattr(steps[g], clock)
            print(
                f"    {labels[g]:<36} {t * 1e3:9.1f} ms {step_flops[g] / t / 1e9:8.1f} GFLOP/s  "
                f"{t / t_fwd:.2f}x forward (FLOP ratio {ideal[g]:.2f}x)"
            )
        verdicts = [
            f"forward {eff:.1%} of peak on executed FLOPs (target >= {eff_target:.0%}: {_met(eff >= eff_target)}); "
            f"counting the reference algorithm's {flops['reference'] / 1e9:.1f} GFLOP it would be "
            f"{flops['reference'] / t_fwd / 1e9 / pk:.1%}"
        ]
        ratio = getattr(steps[False], clock) / t_fwd
        verdicts.append(
            f"{labels[False]} {ratio:.2f}x (target <= {ratio_target}x: {_met(ratio <= ratio_target)})"
        )
        ratio = getattr(steps[True], clock) / t_fwd
        verdicts.append(
            f"{labels[True]} {ratio:.2f}x (no target: its FLOPs alone are {ideal[True]:.2f}x the forward's, so it "
            f"can only reach {ratio_target}x with a backward faster per FLOP than the forward)"
        )
        if floor is not None:
            bound = floor.gemm + floor.cast
            casts = (
                f" + {floor.cast_calls} weight casts {floor.cast * 1e3:.1f} ms" if floor.cast_calls else ""
            )
            verdicts.append(
                f"floor: the forward's {floor.gemm_calls} matrix products ({floor.gemm_flops / 1e9:.1f} GFLOP), each "
                f"replayed alone, take {floor.gemm * 1e3:.1f} ms ({floor.gemm_flops / floor.gemm / 1e9 / pk:.0%} of "
                f"peak){casts}, so no forward doing this work reaches more than "
                f"{flops['executed'] / bound / 1e9 / pk:.1%} of peak on executed FLOPs here (this one spends "
                f"{(t_fwd - bound) * 1e3:.1f} ms more: the other ops, and products slower in context than alone)"
            )
        print("    " + "\n    ".join(verdicts))
        result[clock] = {"efficiency": eff, "ratio_frozen": getattr(steps[False], clock) / t_fwd}
    result["floor"] = floor
    return result


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT met"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--dtype`` and ``--repeats``, shared with the other SVA benchmarks."""
    parser.add_argument(
        "--quick", action="store_true", help="a smaller shape (quarter widths, half grid sides)"
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed repeats after one warm-up (min is reported)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument(
        "--allocator",
        choices=["tuned", "system"],
        default="tuned",
        help="tuned (default, what the cambrian commands use): glibc keeps freed memory in the heap, so large "
        "tensors are not page-faulted in on every allocation; system: glibc's defaults",
    )
    parser.add_argument(
        "--variants",
        default="eager,compiled",
        help="comma-separated: eager (plain PyTorch) and/or compiled (torch.compile, as "
        "schedule.compile_connector trains; its warm-up call includes the compilation, which is not timed)",
    )
    parser.add_argument(
        "--tower-input",
        choices=["tokens", "staged"],
        default="tokens",
        help="tokens (default): the ConvNeXt tower as one 9216 x 5760 token matrix (a feature cache, or a tower "
        "without forward_staged); staged: as StagedTokens, what the composed model hands SVA from a live "
        "multi-stage tower (its 64x64 and 32x32 stages projected before being enlarged)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default; the issue's targets are CPU targets) or cuda, for information",
    )
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        # fp32 matmuls in full fp32, as on the CPU; TF32 would change what "the fp32 peak" means
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.allocator == "system":
        os.environ[ENV] = "system"
    tuned = tune_cpu_allocator()
    shape = "quick" if args.quick else "cambrian-8b"
    staged = args.tower_input == "staged"
    flops = sva_flops(SHAPES[shape], stages=STAGES[shape] if staged else None)
    print(
        f"SVA benchmark, shape {shape}: {SHAPES[shape]}\n"
        f"last tower given as {'StagedTokens ' + str(STAGES[shape]) if staged else 'one token matrix'}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"allocator {'tuned (heap-only glibc malloc)' if tuned else 'system defaults'}\n"
        f"analytic forward FLOPs: executed {flops['executed'] / 1e9:.1f} G; the reference algorithm as written "
        f"needs {flops['reference'] / 1e9:.1f} G ({flops['reference'] / flops['executed']:.2f}x)"
    )
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"eager", "compiled"}
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; use eager and/or compiled")
    for name in ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]:
        floor = None  # measured once per dtype with the eager model, shared by both variants
        for variant in variants:
            result = run(
                shape,
                name,
                args.repeats,
                args.device,
                compiled=variant == "compiled",
                floor=floor,
                staged=staged,
            )
            floor = result["floor"]


if __name__ == "__main__":
    main()
