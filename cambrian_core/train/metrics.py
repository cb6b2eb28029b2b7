"""Seeing the run: FLOPs and MFU, the progress bar, TensorBoard / W&B, the loss curve, the NaN stop.

MFU counts the work each step really does: the LLM analytically (``2 * matmul params * tokens`` plus
attention) times 3 when it trains and 2 when only gradients pass through it; the vision towers and the
connector are measured once per image with ``torch.utils.flop_counter`` (exact for ViTs and ConvNeXts alike),
times 3 when trainable; towers served from the feature cache count zero.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cambrian_core.fileio import jsonl_lines

__all__ = [
    "FlopsCounter",
    "MetricLogger",
    "NonFiniteLossError",
    "check_finite",
    "device_peak_flops",
    "measure_matmul_peak",
    "plot_loss_curve",
]

log = logging.getLogger(__name__)

#: dense bf16 / fp32 (non-tensor-core) peaks of common accelerators, TFLOP/s (vendor spec sheets)
_PEAKS = {
    "H200": (989.4, 66.9),
    "H100": (989.4, 66.9),
    "A100": (312.0, 19.5),
    "L40S": (362.1, 91.6),
    "A10G": (70.0, 35.0),
    "L4": (121.0, 30.3),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before the optimiser applies the bad update."""


def check_finite(
    loss: float,
    step: int,
    last_checkpoint: str | os.PathLike | None,
    indices: Any = None,
    what: str = "loss",
    applied: bool = False,
) -> None:
    """Raise :class:`NonFiniteLossError` naming the step, the batch and the last good checkpoint (``what``: the
    value that went bad, the loss or the gradient norm; ``applied``: the runner applied that update before it
    could see the value)."""
    if math.isfinite(loss):
        return
    where = f" (sample indices {list(indices)[:16]})" if indices is not None else ""
    keep = (
        f"the last good checkpoint is {last_checkpoint}; resume with `--resume {last_checkpoint}`"
        if last_checkpoint
        else "no checkpoint was written yet"
    )
    stopped = (
        "this runner computes it inside its update, which was applied: stopped before any save, so no checkpoint "
        "holds these weights,"
        if applied
        else "stopped before applying the update, so the weights are unchanged"
    )
    raise NonFiniteLossError(
        f"{what} is {loss} at step {step}{where}; {stopped} and {keep}. Usual causes: a learning rate too high for this batch size (try optim.scale_lr_by_batch or a "
        f"lower optim.lr), fp16 overflow (use schedule.precision='bf16'), or a broken sample."
    )


# --------------------------------------------------------------------------------------------------- peaks
def measure_matmul_peak(
    dtype: torch.dtype, device: str | torch.device = "cpu", n: int = 1024, seconds: float = 0.3
) -> float:
    """Achieved FLOP/s of a square matmul in ``dtype`` on ``device`` (a practical peak for MFU on CPUs)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    (a @ b).sum().item()  # warm up
    reps, elapsed = 0, 0.0
    t0 = time.perf_counter()
    while elapsed < seconds or reps < 3:
        a @ b
        reps += 1
        if reps % 4 == 0 or elapsed == 0.0:
            sync()
            elapsed = time.perf_counter() - t0
    sync()
    elapsed = time.perf_counter() - t0
    return 2 * n**3 * reps / elapsed


def device_peak_flops(
    device: torch.device, precision: str, override_tflops: float | None = None
) -> tuple[float, str]:
    """Peak FLOP/s used as the MFU denominator and where it came from (config, spec sheet or measured)."""
    if override_tflops:
        return override_tflops * 1e12, "log.peak_tflops"
    bf16 = precision in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (p16, p32) in _PEAKS.items():
            if key in name:
                return (p16 if bf16 else p32) * 1e12, f"{name} spec sheet"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return measure_matmul_peak(dtype, device), f"measured {dtype} matmul on {device}"


# --------------------------------------------------------------------------------------------------- FLOPs
def _measure(fn: Any, *args: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    # grad mode on: FlopCounterMode's module tracker trips over views of parameters made under no_grad
    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        fn(*args)
    return int(fc.get_total_flops())


def _trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


class FlopsCounter:
    """FLOPs of one training step of a composed model, from the batch's shape.

    Args:
        model: the composed model (``towers``, ``connector``, ``llm``).
        cached_towers: towers are served from the feature cache (their FLOPs are not spent).
        image_sizes_probe: run the towers and connector once on a dummy image to measure per-image FLOPs.
    """

    def __init__(self, model: nn.Module, cached_towers: bool = False, image_sizes_probe: bool = True) -> None:
        llm = model.llm
        emb = llm.model.get_input_embeddings()
        emb_params = sum(p.numel() for p in emb.parameters())
        out = llm.model.get_output_embeddings()
        #: the LM head's matmul (tied or not), counted per position it runs on
        self.head_params = 0 if out is None else int(out.weight.numel())
        self.llm_matmul_params = sum(p.numel() for p in llm.parameters()) - emb_params
        if out is not None and out.weight is not emb.weight:
            self.llm_matmul_params -= self.head_params
        cfg = llm.model.config
        self.layers = int(getattr(cfg, "num_hidden_layers", len(llm.decoder_layers)))
        self.hidden = int(cfg.hidden_size)
        self.llm_mult = 3 if _trainable(llm) else 2
        self.vision_per_image = 0
        self.connector_per_image = 0
        if image_sizes_probe:
            self._probe(model, cached_towers)

    def _probe(self, model: nn.Module, cached: bool) -> None:
        feats = []
        for tower in model.towers:
            dev = next(tower.parameters()).device
            x = torch.zeros(1, 3, tower.image_size, tower.image_size, device=dev)
            f = _measure(tower, x)
            if not cached:
                self.vision_per_image += f * (3 if _trainable(tower) else 1)
            feats.append(torch.zeros(1, tower.token_len, tower.hidden_size, device=dev))
        conn = model.connector
        self.connector_per_image = _measure(conn, feats) * (3 if _trainable(conn) else 1)

    def step_flops(
        self, num_tokens: int, row_lengths: Iterable[int], num_images: int, head_tokens: int | None = None
    ) -> float:
        """FLOPs of a step over ``num_tokens`` LLM tokens whose attention spans ``row_lengths`` (one entry per
        sample, or per row of samples that see each other), with ``num_images``; the LM head runs on
        ``head_tokens`` positions (default: every token; the runners compute it at target tokens only)."""
        attn = 4 * self.layers * self.hidden * sum(int(n) ** 2 for n in row_lengths)
        head = 2 * self.head_params * (num_tokens if head_tokens is None else head_tokens)
        llm = (2 * self.llm_matmul_params * num_tokens + head + attn) * self.llm_mult
        return float(llm + num_images * (self.vision_per_image + self.connector_per_image))


# --------------------------------------------------------------------------------------------------- logging
class MetricLogger:
    """Progress bar, ``metrics.jsonl``, TensorBoard and W&B for the main process (other ranks stay silent).

    Args:
        work_dir: run folder (``metrics.jsonl``, ``tensorboard/``).
        total_steps / start_step: for the bar and its ETA.
        enabled: this is the main process.
        tensorboard: write event files.
        wandb: keyword arguments of ``wandb.init`` (``None`` = off).
        config: the resolved config (stored with the TensorBoard / W&B run).
    """

    def __init__(
        self,
        work_dir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.enabled = enabled
        self.history_path = self.work_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self._truncate_history(start_step)
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "log.tensorboard=True needs the tensorboard package: pip install tensorboard "
                    "(or set log.tensorboard=False)"
                ) from exc
            self.tb = SummaryWriter(
                str(self.work_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
            if config:
                self.tb.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
        if wandb is not None:
            try:
                import wandb as wandb_mod
            except ImportError as exc:
                raise ImportError("log.wandb is set but wandb is not installed: pip install wandb") from exc
            self.wandb = wandb_mod.init(dir=str(self.work_dir), config=dict(config or {}), **dict(wandb))

    def _truncate_history(self, start_step: int) -> None:
        """Drop the rows a previous run wrote after ``start_step`` (steps a resumed run takes again, or a whole
        earlier run when starting from 0), as TensorBoard's ``purge_step`` does; rewritten atomically."""
        if not self.history_path.is_file():
            return
        lines = jsonl_lines(self.history_path.read_text())
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if start_step > 0 and isinstance(row, dict) and int(row.get("step", 0)) <= start_step:
                kept.append(line)
        if len(kept) != len(lines):
            tmp = self.history_path.with_name(self.history_path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.history_path)

    def log(self, step: int, values: Mapping[str, float], split: str = "train") -> None:
        """Record ``values`` at ``step`` (to every sink) and refresh the bar's figures."""
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
        with open(self.history_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=step)
        if self.bar is not None and split == "train":
            short = {
                "loss": "{:.4f}",
                "lr": "{:.2e}",
                "samples_s": "{:.2f}",
                "tokens_s": "{:.0f}",
                "mfu": "{:.1%}",
            }
            self.bar.set_postfix(
                {k: fmt.format(values[k]) for k, fmt in short.items() if k in values}, refresh=False
            )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        """A log line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss_curve(history: str | os.PathLike, out: str | os.PathLike, title: str = "") -> Path | None:
    """Draw train loss (raw and smoothed) and eval loss against step from ``metrics.jsonl`` into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (
        [json.loads(line) for line in jsonl_lines(Path(history).read_text()) if line.strip()]
        if Path(history).is_file()
        else []
    )
    last = {(r["split"], r["step"]): r for r in rows if "loss" in r}  # one point per step: the newest row
    train = sorted((step, r["loss"]) for (split, step), r in last.items() if split == "train")
    evals = sorted((step, r["loss"]) for (split, step), r in last.items() if split == "eval")
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train")
        smooth, acc = [], None
        for v in losses:
            acc = v if acc is None else 0.9 * acc + 0.1 * v
            smooth.append(acc)
        ax.plot(steps, smooth, color="tab:blue", lw=2, label="train (EMA 0.9)")
    if evals:
        steps, losses = zip(*evals, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=2, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
