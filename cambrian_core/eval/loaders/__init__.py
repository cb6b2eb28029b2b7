"""Benchmark loaders by name: ``load_benchmark("vqa_rad", "data/VQA_RAD", split="test")``.

Every loader reads a local copy of the public release exactly as it ships (nothing is downloaded) and returns an
:class:`~cambrian_core.eval.items.EvalSet` whose ``sources`` (the annotation files) are hashed into the results.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cambrian_core.eval.items import DataLayoutError, EvalSet
from cambrian_core.eval.loaders import jsonl, pathvqa, pmc_vqa, slake, vqa_rad

__all__ = ["BENCHMARKS", "Benchmark", "DataLayoutError", "benchmark", "load_benchmark"]


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: its loader, its splits and the split used when none is asked for."""

    name: str
    loader: Callable[..., EvalSet]
    splits: tuple[str, ...]
    default_split: str
    description: str

    def options(self) -> list[str]:
        """Loader keywords besides ``root`` and ``split``."""
        target = self.loader.func if isinstance(self.loader, partial) else self.loader
        fixed = set(self.loader.keywords) if isinstance(self.loader, partial) else set()
        return [p for p in inspect.signature(target).parameters if p not in ("root", "split", *fixed)]


BENCHMARKS: dict[str, Benchmark] = {
    "vqa_rad": Benchmark(
        "vqa_rad", vqa_rad.load, vqa_rad.SPLITS, "test", "VQA-RAD (OSF release or MEVF data_RAD)"
    ),
    "slake": Benchmark(
        "slake", partial(slake.load, lang="en"), slake.SPLITS, "test", "SLAKE 1.0, English rows"
    ),
    "slake_zh": Benchmark(
        "slake_zh", partial(slake.load, lang="zh"), slake.SPLITS, "test", "SLAKE 1.0, Chinese rows"
    ),
    "pathvqa": Benchmark("pathvqa", pathvqa.load, pathvqa.SPLITS, "test", "PathVQA (original pvqa release)"),
    "pmc_vqa": Benchmark(
        "pmc_vqa", pmc_vqa.load, pmc_vqa.SPLITS, "test_clean", "PMC-VQA multiple choice (v1 / v2 CSVs)"
    ),
    "jsonl": Benchmark(
        "jsonl", jsonl.load, ("any",), "test", "private set: JSONL / JSON (flat or LLaVA-Med question format)"
    ),
}
_ALIASES = {
    "vqarad": "vqa_rad",
    "path_vqa": "pathvqa",
    "pvqa": "pathvqa",
    "pmcvqa": "pmc_vqa",
    "slake_en": "slake",
}


def benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (dashes, case and the usual spellings are accepted)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def load_benchmark(name: str, root: str | Path, split: str | None = None, **options: Any) -> EvalSet:
    """Load ``split`` (default: the benchmark's usual test split) of benchmark ``name`` from ``root``."""
    bench = benchmark(name)
    unknown = sorted(set(options) - set(bench.options()))
    if unknown:
        raise ValueError(f"{bench.name} takes no option(s) {unknown}; options: {bench.options() or 'none'}")
    return bench.loader(root, split or bench.default_split, **options)
