"""Medical VQA evaluation: benchmark loaders, batched resumable generation, strict and compatibility metrics,
LLM-as-judge scoring and reports (``cambrian eval``).

* :mod:`.loaders`: VQA-RAD, SLAKE (English / Chinese), PathVQA, PMC-VQA from their public release layouts, and a
  generic JSONL / LLaVA-Med question-file loader for private sets.
* :mod:`.runner`: greedy generation through the serving engine, sharded and resumable.
* :mod:`.metrics` (strict) and :mod:`.compat` (LLaVA-Med / PMC-VQA scorers, for comparison with published numbers).
* :mod:`.scoring`: per-metric means, per-question-type breakdowns, seeded bootstrap confidence intervals.
* :mod:`.judge`: 0-5 rubric grading through an OpenAI-compatible endpoint (versioned prompts in :mod:`.prompts`).
* :mod:`.report`: results JSON, markdown table, bar plot, worst-case errors file.
* :mod:`.pipeline`: all of it in order, resumable (what ``cambrian eval`` runs).
* :mod:`.hook`: a small dev-split evaluation a training loop can call.
"""

from __future__ import annotations

from cambrian_core.eval.items import EvalSet, VQAItem

__all__ = ["EvalSet", "VQAItem"]
