"""One evaluation from start to end: pin the run, generate this shard's missing answers, and once every item has
an answer, score, write the report, and with a judge grade and write it again (what ``cambrian eval`` runs)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cambrian_core.eval.items import EvalSet
from cambrian_core.eval.prompts import resolve_style
from cambrian_core.eval.report import write_report
from cambrian_core.eval.runner import (
    GenerationSummary,
    Predictor,
    check_manifest,
    read_predictions,
    run_generation,
    shard_items,
)
from cambrian_core.eval.scoring import build_metrics, score_items

if TYPE_CHECKING:  # the judge needs httpx, which plain evaluation does not
    from cambrian_core.eval.judge import Judge

__all__ = ["EvalOutcome", "evaluate"]

log = logging.getLogger(__name__)


@dataclass
class EvalOutcome:
    """``status``: ``complete`` (scored, report written) or ``incomplete`` (other shards still owe answers)."""

    status: str
    out_dir: Path
    generation: GenerationSummary | None = None
    missing: int = 0
    paths: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] | None = None


def evaluate(
    evalset: EvalSet,
    predictor: Callable[[], Predictor],
    out_dir: str | Path,
    model: str,
    model_settings: Mapping[str, Any] | None = None,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 8,
    prompt_style: str = "short",
    max_new_tokens: int = 64,
    metrics: Sequence[str] | None = None,
    judge: Judge | None = None,
    judge_kinds: Sequence[str] = ("open",),
    n_boot: int = 1000,
    seed: int = 0,
    worst: int = 50,
    progress: bool = False,
) -> EvalOutcome:
    """Run (or resume) an evaluation in ``out_dir``.

    Args:
        evalset: the loaded split (already limited, if wanted).
        predictor: builds the answerer; called only when this shard still has unanswered items (so a rerun that
            only rescores never loads the model).
        model: the model's name or path, pinned in ``run.json``.
        model_settings: how the model is loaded, pinned with it (``dtype``, ``quantize``, ``tower_paths``,
            ``weights``: see :data:`~cambrian_core.eval.runner.PINNED`).
        shard: ``(i, n)``: this process answers items ``i, i+n, ...``.
        metrics: metric names (default: every registered metric that applies); checked before anything runs.
        judge: grade answers of ``judge_kinds`` items with this LLM judge. The strict report is written first; an
            unusable judge raises :class:`~cambrian_core.eval.judge.JudgeError` and leaves that report in place.
    """
    name, version = resolve_style(prompt_style)
    scorers = build_metrics(metrics)  # a misspelt name fails before the model loads
    out_dir = Path(out_dir)
    manifest = check_manifest(
        out_dir,
        {
            "benchmark": evalset.benchmark,
            "split": evalset.split,
            "sources": evalset.source_hashes(),
            "model": model,
            **(model_settings or {}),
            "prompt": f"{name}.{version}",
            "max_new_tokens": max_new_tokens,
        },
    )
    done = read_predictions(out_dir)
    mine = shard_items(evalset.items, shard)
    gen = None
    if any(it.qid not in done or "error" in done[it.qid] for it in mine):
        gen = run_generation(evalset, predictor(), out_dir, shard, batch_size, prompt_style, progress)
        done = read_predictions(out_dir)
    missing = [it.qid for it in evalset.items if it.qid not in done]
    if missing:
        return EvalOutcome("incomplete", out_dir, gen, missing=len(missing))
    failed = sum(1 for it in evalset.items if "error" in done[it.qid])
    preds = {q: str(rec.get("prediction", "")) for q, rec in done.items()}
    scored = score_items(evalset.items, preds, scorers, n_boot=n_boot, seed=seed)
    paths = write_report(out_dir, evalset, scored, preds, manifest, None, None, failed, worst)
    summary = None
    if judge is not None:  # the strict report stays in place when the judge cannot be reached
        from cambrian_core.eval.judge import JudgeError

        try:
            grades = judge.grade_all(evalset.items, preds, out_dir, judge_kinds)
        except JudgeError as exc:
            raise JudgeError(
                f"{exc}; the strict report, without judge grades, is in place: {', '.join(map(str, paths.values()))}"
            ) from exc
        expected = sum(1 for it in evalset.items if it.kind in judge_kinds)
        summary = judge.summary(grades, expected, n_boot=n_boot, seed=seed)
        paths = write_report(out_dir, evalset, scored, preds, manifest, summary, grades, failed, worst)
    return EvalOutcome("complete", out_dir, gen, 0, paths, scored["metrics"], summary)
