"""Model cards (``README.md``) for saved and exported models.

The card describes the architecture (towers, connector, LLM, parameter counts read from the safetensors
headers) and, when they can be found, the training config, the data-mix manifest and evaluation results:
files in the model folder (``training_config.json``, ``*.manifest.json``, ``eval_results.json``,
``eval/*.json``) or, for a model exported by a training run (``<work_dir>/model``), the run's last checkpoint
config and the manifest of the mix it trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

__all__ = ["CardSources", "find_sources", "model_card", "parameter_counts", "write_model_card"]

_EVAL_NAMES = ("eval_results.json", "evaluation.json", "results.json")


class CardSources:
    """Where a card's optional sections come from (each ``None`` when absent)."""

    def __init__(
        self,
        training_config: Path | None = None,
        manifests: Sequence[Path] = (),
        evals: Sequence[Path] = (),
    ) -> None:
        self.training_config = training_config
        self.manifests = list(manifests)
        self.evals = list(evals)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train_paths(cfg: Any) -> list[str]:
    data = cfg.get("data") if isinstance(cfg, Mapping) else None
    train = data.get("train") if isinstance(data, Mapping) else None
    if isinstance(train, str):
        return [train]
    if isinstance(train, Sequence):
        return [
            t if isinstance(t, str) else str(t.get("path", ""))
            for t in train
            if isinstance(t, (str, Mapping))
        ]
    return []


def find_sources(folder: str | os.PathLike[str]) -> CardSources:
    """Look for a training config, data manifests and evaluation results in and next to ``folder``."""
    folder = Path(folder)
    run = _json(folder / "config.json")
    steps = sorted((folder.parent / "checkpoints").glob("step_*/config.json"))
    if (folder / "training_config.json").is_file():
        training: Path | None = folder / "training_config.json"
    elif isinstance(run, Mapping) and "model" in run and "data" in run:  # a training checkpoint's run config
        training = folder / "config.json"
    else:  # <work_dir>/model: the run's last checkpoint
        training = steps[-1] if steps else None
    manifests = sorted(folder.glob("*.manifest.json"))
    if not manifests and training is not None:
        for p in _train_paths(_json(training)):
            cand = Path(p).with_name(Path(p).stem + ".manifest.json")
            if cand.is_file():
                manifests.append(cand)
    evals = [folder / n for n in _EVAL_NAMES if (folder / n).is_file()]
    for sub in ("eval", "evaluation"):
        evals += sorted(p for p in (folder / sub).glob("*.json") if p.name != "run.json")
        evals += sorted(p for p in (folder / sub).glob("*/**/results.json"))
    return CardSources(training, manifests, evals)


def parameter_counts(folder: str | os.PathLike[str], depth: int = 1) -> dict[str, int]:
    """Parameters per top-level name group (``towers.0``, ``connector``, ``llm`` ...) from safetensors headers."""
    from safetensors import SafetensorError

    from cambrian_core.model.io import ModelFileError

    counts: dict[str, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            f = safe_open(str(path), framework="pt")
        except SafetensorError as exc:
            raise ModelFileError(
                f"{path} cannot be read as safetensors ({exc}); it is truncated or corrupt"
            ) from None
        with f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                parts = key.split(".")
                group = ".".join(parts[: depth + 1]) if parts[0] == "towers" else parts[0]
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= int(d)
                counts[group] = counts.get(group, 0) + n
    return counts


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _flat_numbers(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            out += _flat_numbers(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(prefix, value)]
    return []


def _evaluation(path: Path) -> list[str]:
    """A results table: ``cambrian eval``'s ``results.json`` (metrics with CIs) or any JSON of numbers."""
    doc = _json(path)
    metrics = doc.get("metrics") if isinstance(doc, Mapping) else None
    if (
        isinstance(metrics, Mapping)
        and metrics
        and all(isinstance(m, Mapping) and "value" in m for m in metrics.values())
    ):
        title = " / ".join(str(doc[k]) for k in ("benchmark", "split") if doc.get(k)) or path.name
        out = [
            "",
            f"## Evaluation: {title}",
            "",
            "| metric | value (%) | CI (%) | n |",
            "|---|---:|---:|---:|",
        ]
        for key, m in metrics.items():
            ci = m.get("ci") or (None, None)
            ci_text = f"{100 * ci[0]:.2f} - {100 * ci[1]:.2f}" if None not in ci else ""
            out.append(f"| {m.get('label', key)} | {100 * m['value']:.2f} | {ci_text} | {m.get('n', '')} |")
        return out
    numbers = _flat_numbers(doc)
    if not numbers:
        return []
    out = ["", f"## Evaluation (`{path.name}`)", "", "| metric | value |", "|---|---|"]
    return out + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in numbers]


def _architecture(cfg: Mapping[str, Any], llm_config: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Architecture", "", "| part | type | details |", "|---|---|---|"]
    for i, t in enumerate(cfg.get("vision_tower_aux_list") or []):
        keys = ("token_len", "image_size", "select_layer", "model_name")
        details = ", ".join(f"{k}={t[k]}" for k in keys if t.get(k) is not None)
        lines.append(f"| tower {i} | `{t.get('type')}` | {details} |")
    conn = dict(cfg.get("connector") or {"type": cfg.get("mm_projector_type")})
    ctype = conn.pop("type", None)
    lines.append(f"| connector | `{ctype}` | {', '.join(f'{k}={v}' for k, v in conn.items()) or '-'} |")
    llm = cfg.get("llm") or {}
    details = [f"template={llm.get('template')}"] if llm.get("template") else []
    if llm_config:
        for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            if k in llm_config:
                details.append(f"{k}={llm_config[k]}")
    lines.append(f"| LLM | `{llm.get('type')}` | {', '.join(details) or '-'} |")
    lines += [
        "",
        f"Image grid: {cfg.get('image_token_len')} tokens per image (each grid row ends with a learned newline).",
    ]
    return lines


def model_card(
    config: Mapping[str, Any],
    *,
    title: str,
    llm_config: Mapping[str, Any] | None = None,
    params: Mapping[str, int] | None = None,
    sources: CardSources | None = None,
    usage: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The card's Markdown for the model ``config`` (a cambrian model config dict)."""
    lines = [
        f"# {title}",
        "",
        "A Cambrian-style multimodal LLM (vision towers + connector + LLM) built with `cambrian`.",
        "",
    ]
    lines += list(notes) + ([""] if notes else [])
    lines += _architecture(config, llm_config)
    if params:
        lines += ["", "| parameters | count |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in params.items()]
        lines.append(f"| total | {_fmt(sum(params.values()))} |")
    if usage:
        lines += ["", "## Usage", "", usage.strip()]
    sources = sources or CardSources()
    if sources.training_config is not None:
        run = _json(sources.training_config)
        if isinstance(run, Mapping):
            shown = {k: v for k, v in run.items() if k != "model"}
            lines += [
                "",
                "## Training config",
                "",
                f"From `{sources.training_config.name}` (model section above).",
                "",
            ]
            lines += ["```json", json.dumps(shown, indent=2, default=str), "```"]
    for path in sources.manifests:
        manifest = _json(path)
        if not isinstance(manifest, Mapping):
            continue
        lines += ["", f"## Training data (`{path.name}`)", ""]
        if "total" in manifest:
            lines.append(f"Total records: {manifest['total']}")
        srcs = manifest.get("sources")
        if isinstance(srcs, Mapping) and srcs:
            lines += ["", "| source | details |", "|---|---|"]
            for name, info in srcs.items():
                text = (
                    ", ".join(f"{k}={v}" for k, v in info.items()) if isinstance(info, Mapping) else str(info)
                )
                lines.append(f"| {name} | {text} |")
    for path in sources.evals:
        lines += _evaluation(path)
    return "\n".join(lines) + "\n"


def write_model_card(
    folder: str | os.PathLike[str],
    sources_from: str | os.PathLike[str] | None = None,
    sources: CardSources | None = None,
    usage: str | None = None,
    notes: Sequence[str] = (),
    title: str | None = None,
) -> Path:
    """Write ``README.md`` for the saved cambrian model in ``folder``; returns its path.

    Args:
        sources_from: folder searched for the optional sections (default: ``folder``).
        sources: explicit optional sections (overrides the search).
        usage: the Usage section (default: loading with ``cambrian_core``).
        notes: lines under the title.
        title: card title (default: the folder name).
    """
    from cambrian_core.model.io import read_meta

    folder = Path(folder)
    cfg = read_meta(folder)["model"]
    llm_cfg = _json(folder / "llm" / "config.json")
    usage = usage or (
        "```python\nfrom cambrian_core.model.io import load_model\n\n"
        f'model = load_model("{title or folder.name}")\nprint(model.chat("Describe the image.", images=[image]))\n```'
    )
    text = model_card(
        cfg,
        title=title or folder.name,
        llm_config=llm_cfg,
        params=parameter_counts(folder),
        sources=sources or find_sources(sources_from or folder),
        usage=usage,
        notes=notes,
    )
    path = folder / "README.md"
    path.write_text(text)
    return path
