"""Evaluation outputs: ``results.json``, ``results.md`` (tables), ``results.png`` (bars with confidence intervals)
and ``errors.jsonl`` (the worst-scored items with their predictions)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cambrian_core.eval.items import EvalSet, VQAItem

__all__ = ["PRIMARY", "build_results", "markdown", "plot", "worst_items", "write_report"]

log = logging.getLogger(__name__)

#: the metric that ranks an item of each kind in the errors file
PRIMARY = {"closed": "closed_accuracy", "open": "open_f1", "choice": "choice_accuracy"}
_FAMILY_TITLES = {
    "strict": "Strict metrics",
    "llava_med": "LLaVA-Med-compatible (substring matching; only for comparison with published numbers)",
    "pmc_vqa": "PMC-VQA-compatible (MedVInT-TE difflib letter; only for comparison with published numbers)",
}


#: how the model was loaded, copied from ``run.json`` into the results
_MODEL_SETTINGS = ("dtype", "quantize", "tower_paths", "weights")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cambrian")
    except Exception:
        return "unknown"


def build_results(
    evalset: EvalSet,
    scored: Mapping[str, Any],
    manifest: Mapping[str, Any],
    judge: Mapping[str, Any] | None = None,
    failed: int = 0,
) -> dict[str, Any]:
    """The results document (everything but per-item scores)."""
    kinds = Counter(it.kind for it in evalset.items)
    return {
        "benchmark": evalset.benchmark,
        "split": evalset.split,
        "n_items": len(evalset.items),
        "kinds": dict(sorted(kinds.items())),
        "sources": manifest.get("sources") or evalset.source_hashes(),
        "notes": list(evalset.notes),
        "model": manifest.get("model"),
        "model_settings": {k: manifest[k] for k in _MODEL_SETTINGS if k in manifest},
        "prompt": manifest.get("prompt"),
        "generation": {"greedy": True, "max_new_tokens": manifest.get("max_new_tokens")},
        "failed_generations": failed,
        "bootstrap": {"n_boot": scored["n_boot"], "level": scored["level"], "seed": scored["seed"]},
        "metrics": scored["metrics"],
        "judge": dict(judge) if judge else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cambrian_version": _version(),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(results: Mapping[str, Any]) -> str:
    """Tables of the results: metrics by family, judge axes, per-question-type breakdown."""
    kinds = ", ".join(f"{k} {n}" for k, n in results["kinds"].items())
    lines = [
        f"# {results['benchmark']} / {results['split']}: {results['model']}",
        "",
        f"- items: {results['n_items']} ({kinds}); prompt `{results['prompt']}`; greedy, at most "
        f"{results['generation']['max_new_tokens']} new tokens; failed generations: {results['failed_generations']}",
        f"- intervals: {100 * results['bootstrap']['level']:.0f}% percentile bootstrap, "
        f"{results['bootstrap']['n_boot']} resamples, seed {results['bootstrap']['seed']}",
    ]
    lines += [f"- annotation file `{name}` sha256 `{digest}`" for name, digest in results["sources"].items()]
    lines += [f"- {note}" for note in results["notes"]]
    metrics = results["metrics"]
    for family, title in _FAMILY_TITLES.items():
        rows = [(k, m) for k, m in metrics.items() if m["family"] == family]
        if not rows:
            continue
        lines += ["", f"## {title}", "", "| metric | value (%) | CI (%) | n |", "|---|---:|---:|---:|"]
        for _, m in rows:
            lines.append(
                f"| {m['label']} | {_pct(m['value'])} | {_pct(m['ci'][0])} - {_pct(m['ci'][1])} | {m['n']} |"
            )
    others = [(k, m) for k, m in metrics.items() if m["family"] not in _FAMILY_TITLES]
    if others:
        lines += ["", "## Other metrics", "", "| metric | value (%) | CI (%) | n |", "|---|---:|---:|---:|"]
        lines += [
            f"| {m['label']} | {_pct(m['value'])} | {_pct(m['ci'][0])} - {_pct(m['ci'][1])} | {m['n']} |"
            for _, m in others
        ]
    judge = results.get("judge")
    if judge and judge.get("axes"):
        lines += [
            "",
            f"## LLM judge: {judge['model']} (reported: {', '.join(judge['reported_models']) or '?'}), prompt "
            f"`{judge['prompt']}`, scale 0-5",
            "",
            f"graded {judge['n']} items, {judge['n_failed']} failed",
            "",
            "| axis | mean | CI | n |",
            "|---|---:|---:|---:|",
        ]
        for axis, a in judge["axes"].items():
            lines.append(f"| {axis} | {a['value']:.2f} | {a['ci'][0]:.2f} - {a['ci'][1]:.2f} | {a['n']} |")
    strict = [(k, m) for k, m in metrics.items() if m["family"] == "strict"]
    for key in ("question_type", "lang"):
        groups = sorted({g for _, m in strict for g in m["by"].get(key, {})})
        if len(groups) < 2:
            continue
        lines += ["", f"## By {key.replace('_', ' ')} (strict, %; n in brackets)", ""]
        lines.append("| " + key.replace("_", " ") + " | " + " | ".join(m["label"] for _, m in strict) + " |")
        lines.append("|---|" + "---:|" * len(strict))
        for g in groups:
            cells = []
            for _, m in strict:
                cell = m["by"].get(key, {}).get(g)
                cells.append(f"{_pct(cell['value'])} ({cell['n']})" if cell else "")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Bar chart of every metric with its confidence interval (and the judge axes when present).

    Returns ``None`` (with a warning) when matplotlib is not installed (``pip install cambrian[eval]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no bar plot (pip install 'cambrian[eval]')")
        return None
    metrics = list(results["metrics"].values())
    judge = results.get("judge") or {}
    axes_n = 2 if judge.get("axes") else 1
    fig, axes = plt.subplots(
        1, axes_n, figsize=(max(6, 1.1 * len(metrics) + 2) + 3 * (axes_n - 1), 4.8), squeeze=False
    )
    colors = {"strict": "#2b6cb0", "llava_med": "#dd6b20", "pmc_vqa": "#38a169"}
    ax = axes[0][0]
    values = [100 * m["value"] for m in metrics]
    err = [
        [100 * (m["value"] - m["ci"][0]) for m in metrics],
        [100 * (m["ci"][1] - m["value"]) for m in metrics],
    ]
    ax.bar(
        range(len(metrics)),
        values,
        yerr=err,
        capsize=4,
        color=[colors.get(m["family"], "#718096") for m in metrics],
    )
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m["label"] for m in metrics], rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(f"{results['benchmark']} / {results['split']} (n={results['n_items']})", fontsize=10)
    for i, v in enumerate(values):
        ax.text(i, min(v + 2, 100), f"{v:.1f}", ha="center", fontsize=7)
    from matplotlib.patches import Patch

    present = list(dict.fromkeys(m["family"] for m in metrics))
    ax.legend(
        handles=[Patch(color=colors.get(f, "#718096"), label=f) for f in present],
        fontsize=7,
        loc="lower right",
        title="scorer",
        title_fontsize=7,
    )
    if axes_n == 2:
        jx = axes[0][1]
        names = list(judge["axes"])
        vals = [judge["axes"][a]["value"] for a in names]
        jerr = [
            [judge["axes"][a]["value"] - judge["axes"][a]["ci"][0] for a in names],
            [judge["axes"][a]["ci"][1] - judge["axes"][a]["value"] for a in names],
        ]
        jx.bar(range(len(names)), vals, yerr=jerr, capsize=4, color="#805ad5")
        jx.set_xticks(range(len(names)))
        jx.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        jx.set_ylim(0, 5.2)
        jx.set_title(f"judge {judge['model']} ({judge['prompt']})", fontsize=10)
    fig.suptitle(str(results["model"]), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def worst_items(
    items: Sequence[VQAItem],
    predictions: Mapping[str, str],
    per_item: Mapping[str, Mapping[str, float]],
    grades: Mapping[str, Mapping[str, Any]] | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The ``limit`` lowest-scored items (strict primary metric of their kind, then judge grade), imperfect only."""
    rows = []
    for it in items:
        scores = dict(per_item.get(it.qid, {}))
        primary = scores.get(PRIMARY[it.kind])
        if primary is None:
            strict = [v for k, v in scores.items() if not k.startswith(("llava_med", "pmc_vqa"))]
            primary = sum(strict) / len(strict) if strict else None
        grade = (grades or {}).get(it.qid)
        judged = grade["overall"] / 5.0 if grade else None
        if primary is None and judged is None:
            continue
        rank = primary if primary is not None else judged
        if rank >= 1.0 and (judged is None or judged >= 1.0):
            continue
        row = {**it.to_dict(), "prediction": predictions.get(it.qid, ""), "scores": scores}
        if grade:
            row["judge"] = {"scores": grade["scores"], "overall": grade["overall"]}
        rows.append((rank, judged if judged is not None else 1.0, it.qid, row))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return [r[3] for r in rows[:limit]]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    out_dir: str | Path,
    evalset: EvalSet,
    scored: Mapping[str, Any],
    predictions: Mapping[str, str],
    manifest: Mapping[str, Any],
    judge: Mapping[str, Any] | None = None,
    grades: Mapping[str, Mapping[str, Any]] | None = None,
    failed: int = 0,
    worst: int = 50,
) -> dict[str, Path]:
    """Write every output to ``out_dir``; returns ``{"results", "markdown", "plot", "errors"}`` paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = build_results(evalset, scored, manifest, judge, failed)
    paths = {
        "results": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "errors": out_dir / "errors.jsonl",
    }
    _atomic_text(paths["results"], json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    _atomic_text(paths["markdown"], markdown(results))
    rows = worst_items(evalset.items, predictions, scored["per_item"], grades, worst)
    _atomic_text(paths["errors"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    png = plot(results, out_dir / "results.png")
    if png is not None:
        paths["plot"] = png
    return paths
