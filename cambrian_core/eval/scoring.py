"""Scoring a set of predictions: per-item scores, means, per-question-type breakdowns, bootstrap intervals."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cambrian_core.eval.items import VQAItem
from cambrian_core.eval.metrics import Metric

__all__ = ["IncompletePredictionsError", "bootstrap_ci", "build_metrics", "score_items"]


class IncompletePredictionsError(ValueError):
    """Some items have no prediction yet (e.g. other shards are still running)."""


def _is_vqa_metric(target: Any) -> bool:
    """A :class:`Metric` subclass, or a class shaped like one (``kind``, ``applies``, ``score``)."""
    if not isinstance(target, type):
        return False
    return issubclass(target, Metric) or all(hasattr(target, a) for a in ("kind", "applies", "score", "info"))


def build_metrics(names: Sequence[str] | None = None) -> list[Metric]:
    """Metric objects from ``METRICS`` by name (default: every registered VQA metric, strict ones first)."""
    from cambrian_core.eval.compat import COMPAT_METRICS
    from cambrian_core.eval.metrics import STRICT_METRICS
    from cambrian_core.registry import METRICS, build

    if names is None:  # every VQA metric; other metric kinds a plugin may register are left out
        order = [cls.name for cls in (*STRICT_METRICS, *COMPAT_METRICS)]
        vqa = [n for n in METRICS.names() if _is_vqa_metric(METRICS.get(n))]
        names = sorted(vqa, key=lambda n: (order.index(n) if n in order else len(order), n))
    return [build(METRICS, {"type": n}) for n in names]


def bootstrap_ci(
    scores: Sequence[float] | np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampling items with replacement, seeded).

    A single score (or ``n_boot == 0``) gives the degenerate interval ``(mean, mean)``.
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one score")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if x.size == 1 or n_boot <= 0:
        m = float(x.mean())
        return m, m
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, min(n_boot, 4_000_000 // x.size))  # bounded memory for large splits
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _groups(items: Sequence[VQAItem]) -> dict[str, Any]:
    """Breakdown keys: the question type always, the language when several occur."""
    keys: dict[str, Any] = {"question_type": lambda it: it.question_type or "(none)"}
    if len({it.lang for it in items}) > 1:
        keys["lang"] = lambda it: it.lang
    return keys


def score_items(
    items: Sequence[VQAItem],
    predictions: Mapping[str, str],
    metrics: Sequence[Metric] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Score ``predictions`` (``{qid: text}``) against ``items``.

    Returns ``{"metrics": {name: {value, ci, n, label, kind, family, description, by: {key: {group: {value,
    n}}}}}, "per_item": {qid: {metric: score}}, "n_items", "n_missing", "level", "n_boot", "seed"}``. Metrics that
    apply to no item are left out. Missing predictions raise :class:`IncompletePredictionsError` unless
    ``allow_missing`` (then they score as empty answers).
    """
    metrics = list(metrics) if metrics is not None else build_metrics()
    missing = [it.qid for it in items if it.qid not in predictions]
    if missing and not allow_missing:
        raise IncompletePredictionsError(
            f"{len(missing)} of {len(items)} items have no prediction (e.g. {missing[:3]}); finish generating "
            "them (every shard) or score with allow_missing"
        )
    groups = _groups(items)
    per_item: dict[str, dict[str, float]] = {it.qid: {} for it in items}
    out: dict[str, Any] = {}
    for metric in metrics:
        scores, by = [], {k: defaultdict(list) for k in groups}
        for it in items:
            if not metric.applies(it):
                continue
            s = float(metric.score(predictions.get(it.qid, ""), it))
            scores.append(s)
            per_item[it.qid][metric.name] = s
            for key, fn in groups.items():
                by[key][fn(it)].append(s)
        if not scores:
            continue
        lo, hi = bootstrap_ci(scores, n_boot, level, seed)
        out[metric.name] = {
            **metric.info(),
            "value": float(np.mean(scores)),
            "ci": [lo, hi],
            "n": len(scores),
            "by": {
                key: {g: {"value": float(np.mean(v)), "n": len(v)} for g, v in sorted(vals.items())}
                for key, vals in by.items()
            },
        }
    return {
        "metrics": out,
        "per_item": per_item,
        "n_items": len(items),
        "n_missing": len(missing),
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
    }
