"""Evaluation during training: answer a small dev split with the model being trained and return its metrics.

``hook = EvalHook("slake", "data/Slake1.0", split="validate", limit=64)`` then ``hook(model, step)`` every so
often (main process only). Generation goes through the same engine as serving, in greedy mode; the model comes
back in the mode it was in. Results can also be written (``out_dir/step-<N>/``) and logged with any object that
has ``log(step, values, split=...)`` (the recipe's ``MetricLogger``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cambrian_core.eval.items import EvalSet
from cambrian_core.eval.loaders import load_benchmark
from cambrian_core.eval.prompts import resolve_style
from cambrian_core.eval.report import write_report
from cambrian_core.eval.runner import EnginePredictor, predict_items
from cambrian_core.eval.scoring import build_metrics, score_items

__all__ = ["EvalHook"]


class EvalHook:
    """Scores a model on the first ``limit`` items of a benchmark split.

    Args:
        benchmark / data / split / options: what :func:`~cambrian_core.eval.loaders.load_benchmark` loads.
        limit: items used (the first ones of the split, the same every call).
        batch_size / max_new_tokens / prompt_style: generation settings.
        metrics: metric names (default: every registered metric that applies).
        out_dir: when set, each call writes its report to ``out_dir/step-<step>/``.
        n_boot: bootstrap resamples for the written report's intervals (the returned dict has means only).
    """

    def __init__(
        self,
        benchmark: str,
        data: str | Path,
        split: str | None = None,
        limit: int | None = 64,
        batch_size: int = 8,
        max_new_tokens: int = 32,
        prompt_style: str = "short",
        metrics: Sequence[str] | None = None,
        out_dir: str | Path | None = None,
        n_boot: int = 200,
        **options: Any,
    ) -> None:
        resolve_style(prompt_style)
        self.benchmark, self.data, self.split, self.options = benchmark, data, split, options
        self.limit = limit
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt_style = prompt_style
        self.metric_names = metrics
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.n_boot = n_boot
        self._evalset: EvalSet | None = None

    @property
    def evalset(self) -> EvalSet:
        """The dev items (loaded once, on first use)."""
        if self._evalset is None:
            self._evalset = load_benchmark(self.benchmark, self.data, self.split, **self.options).limit(
                self.limit
            )
        return self._evalset

    def __call__(self, model: Any, step: int, logger: Any = None) -> dict[str, float]:
        """Answer the dev items with ``model`` and return ``{"<benchmark>/<metric>": value}``."""
        from cambrian_core.serve.engine import InferenceEngine

        evalset = self.evalset
        was_training = bool(getattr(model, "training", False))
        model.eval()  # no dropout while answering; the previous mode comes back below
        try:
            engine = InferenceEngine(
                model, name=f"step-{step}", max_batch_size=self.batch_size, batch_wait=0.01
            )
            try:
                answers = predict_items(
                    evalset.items,
                    EnginePredictor(engine, self.max_new_tokens),
                    self.batch_size,
                    self.prompt_style,
                )
            finally:
                engine.shutdown()
        finally:
            model.train(was_training)
        preds = {q: a.text for q, a in answers.items()}
        scored = score_items(evalset.items, preds, build_metrics(self.metric_names), n_boot=self.n_boot)
        values = {f"{evalset.benchmark}/{k}": m["value"] for k, m in scored["metrics"].items()}
        failed = sum(1 for a in answers.values() if a.error is not None)
        values[f"{evalset.benchmark}/failed"] = float(failed)
        if self.out_dir is not None:
            name, version = resolve_style(self.prompt_style)
            manifest = {
                "model": f"training step {step}",
                "prompt": f"{name}.{version}",
                "max_new_tokens": self.max_new_tokens,
            }
            write_report(self.out_dir / f"step-{step}", evalset, scored, preds, manifest, failed=failed)
        if logger is not None:
            logger.log(step, values, split="vqa")
        return values
