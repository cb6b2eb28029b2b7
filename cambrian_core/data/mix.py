"""Mix converted record sets into one training file with a manifest (counts per source and per stage).

Two ways to size the mix:

* without ``total``, ``ratio`` is the share of each source to take: ``0.5`` = half its records, ``1`` = all,
  ``2`` = twice (needs ``replace=True``);
* with ``total``, ratios are relative weights; source *i* contributes ``total * w_i / sum(w)`` records (largest
  remainder rounding, so the counts add up to ``total`` exactly).

Sampling is seeded (one independent stream per source, so adding a source leaves the others' picks unchanged),
without replacement by default; the mix is shuffled with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cambrian_core.data.records import iter_records, rebase_images, write_jsonl

__all__ = ["MixError", "MixInput", "mix", "parse_mix_input"]


class MixError(ValueError):
    """The requested mix cannot be drawn from the inputs."""


@dataclass(frozen=True)
class MixInput:
    """One source of a mix: ``name``, record file ``path`` and ``ratio`` (see the module docstring)."""

    name: str
    path: Path
    ratio: float = 1.0


def parse_mix_input(spec: str) -> MixInput:
    """Parse ``NAME=PATH[:RATIO]`` (the CLI form)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise MixError(f"--input expects NAME=PATH[:RATIO], got {spec!r}")
    path, ratio = rest, "1"
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            float(tail)
        except ValueError:
            if Path(head).is_file() and not Path(rest).exists():  # `file.jsonl:abc`: a bad ratio, not a path
                raise MixError(f"--input {name}: ratio must be a number >= 0, got {tail!r}") from None
        else:
            path, ratio = head, tail
    value = float(ratio)
    if not math.isfinite(value) or value < 0:
        raise MixError(f"--input {name}: ratio must be a finite number >= 0, got {ratio!r}")
    return MixInput(name, Path(path), value)


def _counts(inputs: list[MixInput], sizes: list[int], total: int | None) -> list[int]:
    if total is None:
        return [round(inp.ratio * n) for inp, n in zip(inputs, sizes, strict=True)]
    weight = sum(inp.ratio for inp in inputs)
    if weight <= 0:
        raise MixError("all ratios are 0; give at least one source a positive ratio")
    exact = [total * inp.ratio / weight for inp in inputs]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(inputs)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")


def mix(
    inputs: list[MixInput],
    out: str | Path,
    total: int | None = None,
    seed: int = 0,
    replace: bool = False,
    stage: str | None = None,
) -> dict[str, Any]:
    """Draw the mix into ``out`` (JSONL) and write ``<out stem>.manifest.json``; returns the manifest.

    ``stage`` keeps only records of that stage (``"caption"`` for alignment, ``"instruct"`` for fine-tuning).
    Image paths are rewritten relative to ``out``'s folder; each record gets ``provenance.mix_input``.
    """
    if not inputs:
        raise MixError("no inputs to mix")
    if total is not None and total < 1:
        raise MixError(f"--total must be >= 1, got {total}")
    names = [inp.name for inp in inputs]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise MixError(f"input names must be unique; repeated: {', '.join(dup)}")
    out = Path(out)
    pools: list[list[dict[str, Any]]] = []
    bad: Counter = Counter()
    for inp in inputs:
        pool = []
        for _, rec in iter_records(inp.path):
            if isinstance(rec, str):
                bad[inp.name] += 1
            elif stage is None or rec.get("stage") == stage:
                pool.append(rebase_images(rec, inp.path.parent, out.parent))
        pools.append(pool)
    sizes = [len(p) for p in pools]
    counts = _counts(inputs, sizes, total)
    picked: list[dict[str, Any]] = []
    manifest_sources: dict[str, Any] = {}
    used: set[str] = set()  # ids in the output: unique over every input (a repeat gets the first free "~N")
    for inp, pool, k in zip(inputs, pools, counts, strict=True):
        rng = random.Random(_seed(seed, inp.name))
        if k > len(pool) and not replace:
            raise MixError(
                f"source {inp.name!r} has {len(pool)} records{f' of stage {stage!r}' if stage else ''} but the mix "
                f"needs {k}; pass replace=True (--replace) to upsample, or lower its ratio or the total"
            )
        if k and not pool:
            raise MixError(f"source {inp.name!r} ({inp.path}) has no usable records")
        # every record once before any twice: whole shuffled copies, then a sample of the rest (plain random
        # draws with replacement would leave ~37 % of a ratio-1 source out while repeating others)
        copies, rest = divmod(k, len(pool)) if pool else (0, 0)
        chosen = [rec for _ in range(copies) for rec in rng.sample(pool, len(pool))] + rng.sample(pool, rest)
        seen: Counter = Counter()
        for rec in chosen:
            rec = dict(rec)
            rid = str(rec.get("id", ""))
            seen[rid] += 1
            n = seen[rid]
            new_id = rid if n == 1 else f"{rid}~{n}"
            while new_id in used:
                n += 1
                new_id = f"{rid}~{n}"
            used.add(new_id)
            if new_id != rid:
                rec["id"] = new_id
            rec["provenance"] = {**(rec.get("provenance") or {}), "mix_input": inp.name}
            picked.append(rec)
        manifest_sources[inp.name] = {
            "path": str(inp.path),
            "ratio": inp.ratio,
            "available": len(pool),
            "available_by_stage": dict(Counter(str(r.get("stage")) for r in pool)),
            "unreadable_lines": bad[inp.name],
            "selected": k,
            "unique_selected": len(seen),
            "by_stage": dict(Counter(str(r.get("stage")) for r in chosen)),
        }
    random.Random(seed).shuffle(picked)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, picked)
    manifest = {
        "output": str(out),
        "total": len(picked),
        "seed": seed,
        "replace": replace,
        "stage": stage,
        "requested_total": total,
        "by_stage": dict(Counter(str(r.get("stage")) for r in picked)),
        "sources": manifest_sources,
    }
    out.with_name(out.stem + ".manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest
