"""Typed schemas for a resolved config, checked in one pass that reports every problem at once.

Two kinds of section exist:

* plain sections (``data``, ``optim``, ``schedule`` ...) described by dataclasses: unknown keys are errors,
  values are type-checked;
* component sections (``model``, ``runner``): a dict with ``type`` naming a registered component, whose
  keywords are checked against the component's signature. A component class may declare
  ``config_components = {"param": "registry kind"}`` so nested component dicts are checked too (with
  ``config_supplied = {"param": ("keyword", ...)}`` naming keywords it fills in for a child itself), and a
  ``check_config(kwargs) -> list[str]`` classmethod for cross-field checks (shapes, divisibility) that
  run before any weights load.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cambrian_core.registry import REGISTRIES, BuildError, check_kwargs, suggest

__all__ = [
    "SECTIONS",
    "CheckpointSection",
    "DataSection",
    "EvalSection",
    "LogSection",
    "LoraSection",
    "OptimSection",
    "Problem",
    "ScheduleSection",
    "register_section",
    "validate_tree",
]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (dotted key) and what (with a suggestion when one exists)."""

    key: str
    message: str
    file: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


#: names the training recipe understands (kept here so the config check needs no torch)
OPTIMIZERS = ("AdamW", "Adam", "SGD")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("bf16", "fp16", "fp32")


def _outside(v: Any, rule: str, arg: Any) -> str | None:
    """What is wrong with ``v`` under ``rule`` (``None``: nothing)."""
    if rule == "in":
        return None if v in arg else f"must be one of {', '.join(map(str, arg))}"
    if rule == ">=":
        return None if v >= arg else f"must be >= {arg}"
    if rule == ">":
        return None if v > arg else f"must be > {arg}"
    if rule == "0..1":
        return None if 0 <= v <= 1 else "must be between 0 and 1"
    if rule == "0..<1":
        return None if 0 <= v < 1 else "must be >= 0 and < 1"
    if rule == "-1|>=1":
        return None if v == -1 or v >= 1 else "must be -1 (off) or >= 1"
    raise ValueError(f"unknown rule {rule!r}")


def _bounds(value: Mapping[str, Any], rules: dict[str, tuple[str, Any]]) -> list[tuple[str, str]]:
    """``(key, message)`` for each field of ``value`` (a section dict) outside its rule.

    A rule is ``(">=", 1)``, ``(">", 0)``, ``("in", choices)``, ``("0..1", None)``, ``("0..<1", None)`` or
    ``("-1|>=1", None)``; ``None`` values are not checked (they mean "off" where a field allows it).
    """
    out = []
    for key, (rule, arg) in rules.items():
        v = value.get(key)
        if v is None or isinstance(v, bool) or (rule != "in" and not isinstance(v, (int, float))):
            continue
        problem = _outside(v, rule, arg)
        if problem:
            out.append((key, f"{problem}, got {v!r}"))
    return out


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class DataSection:
    """Training / evaluation data (LLaVA-format JSONL, e.g. the ``records.jsonl`` of ``cambrian convert``).

    ``batch_size`` is per device and micro-step; ``image_folder`` is the base of relative image paths (``None``:
    the folder of each JSONL file); ``val`` is a held-out file, else ``val_fraction`` of ``train`` is held out;
    ``feature_cache`` is a folder for frozen-tower features (shared across runs); ``pad_to_multiple_of`` rounds
    the dynamic padding up (8 for tensor cores, 64+ on XLA).
    """

    train: str | list[str] | None = None
    val: str | list[str] | None = None
    image_folder: str | None = None
    max_length: int = 2048
    packing: bool = False
    group_by_length: bool = True
    batch_size: int = 1
    num_workers: int = 0
    val_fraction: float = 0.0
    feature_cache: str | None = None
    pad_to_multiple_of: int = 1

    @staticmethod
    def value_problems(value: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Values outside their range (types are checked separately)."""
        return _bounds(
            value,
            {
                "max_length": (">=", 1),
                "batch_size": (">=", 1),
                "num_workers": (">=", 0),
                "val_fraction": ("0..<1", None),
                "pad_to_multiple_of": (">=", 1),
            },
        )


@dataclass
class OptimSection:
    """Optimiser and per-module learning rates (``lr_groups`` maps a module prefix to its lr).

    ``scale_lr_by_batch`` applies the seed rule ``lr = lr * sqrt(global_batch / base_batch_size)`` to every lr.
    """

    type: str = "AdamW"
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] | list[float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_groups: dict[str, float] = field(default_factory=dict)
    scale_lr_by_batch: bool = False
    base_batch_size: int = 512

    @staticmethod
    def value_problems(value: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Values outside their range (types are checked separately)."""
        return _bounds(
            value,
            {
                "type": ("in", OPTIMIZERS),
                "lr": (">=", 0),
                "weight_decay": (">=", 0),
                "eps": (">", 0),
                "base_batch_size": (">=", 1),
            },
        )


@dataclass
class ScheduleSection:
    """Length and shape of the run (``max_steps`` > 0 overrides ``epochs``; ``scheduler``: cosine, linear,
    constant, after ``warmup_ratio`` of the updates; ``eval_interval`` 0 = evaluate only at the end;
    ``compile_connector``: run the connector through ``torch.compile``, see ``CambrianModel.compile_connector``)."""

    epochs: int = 1
    max_steps: int = -1
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip_grad: float | None = 1.0
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    compile_connector: bool = False
    eval_interval: int = 0
    eval_max_batches: int = 0

    @staticmethod
    def value_problems(value: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Values outside their range (types are checked separately)."""
        return _bounds(
            value,
            {
                "epochs": (">=", 1),
                "max_steps": ("-1|>=1", None),
                "warmup_ratio": ("0..1", None),
                "scheduler": ("in", SCHEDULERS),
                "min_lr_ratio": ("0..1", None),
                "grad_accum": (">=", 1),
                "clip_grad": (">", 0),
                "precision": ("in", PRECISIONS),
                "eval_interval": (">=", 0),
                "eval_max_batches": (">=", 0),
            },
        )


@dataclass
class CheckpointSection:
    """When checkpoints are written (every ``interval`` updates and at the end), how many stay, and whether the
    trained model is exported with ``save_pretrained`` to ``<work_dir>/model`` at the end."""

    interval: int = 500
    keep_last: int = 2
    export: bool = True

    @staticmethod
    def value_problems(value: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Values outside their range (types are checked separately)."""
        return _bounds(value, {"interval": (">=", 1), "keep_last": (">=", 1)})


@dataclass
class LogSection:
    """What the run shows while it goes (``peak_tflops``: MFU denominator per device; ``None`` = the spec sheet
    of a known GPU, else a matmul measured at start)."""

    interval: int = 10
    tensorboard: bool = True
    wandb: dict[str, Any] | None = None
    plot: bool = True
    mfu: bool = True
    peak_tflops: float | None = None

    @staticmethod
    def value_problems(value: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Values outside their range (types are checked separately)."""
        return _bounds(value, {"interval": (">=", 1), "peak_tflops": (">", 0)})


@dataclass
class EvalSection:
    """Medical-VQA scoring of a small dev split during training, through the serving engine (the
    ``cambrian eval`` metrics); runs with every held-out evaluation and at the end, on the main rank (sharded
    runners gather an unsharded copy of the model there for it).

    ``benchmark``: vqa_rad, slake, pathvqa, pmc_vqa or jsonl; ``data``: its local folder or file; ``limit``: the
    first N items of ``split``; ``options``: the benchmark's own loader keywords (``cambrian eval list`` shows
    them, e.g. ``{"layout": "osf"}`` for vqa_rad).
    """

    benchmark: str = ""
    data: str = ""
    split: str | None = None
    limit: int = 64
    batch_size: int = 8
    max_new_tokens: int = 32
    prompt_style: str = "short"
    metrics: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def value_problems(value: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Values outside their range (types are checked separately)."""
        return _bounds(value, {"limit": (">=", 1), "batch_size": (">=", 1), "max_new_tokens": (">=", 1)})


@dataclass(frozen=True)
class LoraSection:
    """LoRA on the LLM through peft (reference §C.2 defaults: r 64, alpha 16, dropout 0.05, every linear layer);
    ``qlora``: the decoder's linear layers in bitsandbytes 4-bit NF4 first (CUDA or CPU), computing in
    ``compute_dtype``. See :mod:`cambrian_core.train.lora`."""

    r: int = 64
    alpha: int | float = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    qlora: bool = False
    compute_dtype: str = "bfloat16"

    @staticmethod
    def value_problems(value: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Values outside their range (types are checked separately)."""
        rules = {
            "r": (">=", 1),
            "alpha": (">", 0),
            "dropout": ("0..<1", None),
            "compute_dtype": ("in", ("bfloat16", "float16", "float32")),
        }
        return _bounds(value, rules)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LoraSection:
        """The section from a config dict (unknown keys are an error naming the accepted ones)."""
        problems = _check_dataclass(cls, cfg, "lora")
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()})


#: top-level key -> dataclass (plain section) or registry kind (component section) or a python type
SECTIONS: dict[str, Any] = {
    "model": "models",
    "runner": "runners",
    "data": DataSection,
    "optim": OptimSection,
    "schedule": ScheduleSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
    "lora": LoraSection,
    "stage": str,
    "work_dir": str,
    "seed": int,
    "resume": (str, bool, type(None)),
    "load_from": (str, type(None)),
    "eval": EvalSection,
}

#: sections that may be set to ``None`` (the feature off, as when the key is absent)
OPTIONAL_SECTIONS = {"lora", "eval"}


def register_section(name: str, spec: Any) -> None:
    """Let a plugin add a top-level config section (a dataclass, a registry kind or a type)."""
    if name in SECTIONS and SECTIONS[name] is not spec:
        raise ValueError(f"config section `{name}` is already defined as {SECTIONS[name]!r}")
    SECTIONS[name] = spec


# ----------------------------------------------------------------------------------------------- checks
def _type_ok(value: Any, hint: Any) -> bool:
    """A lenient isinstance for the hints used in the sections above."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    args = typing.get_args(hint)
    if origin is not None:
        hint = origin
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if hint is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: that many items
            return len(value) == len(args) and all(map(_type_ok, value, args))
        return not args or all(_type_ok(v, args[0]) for v in value)
    if hint is dict:
        return isinstance(value, Mapping) and (
            not args or all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
        )
    return isinstance(value, hint) if isinstance(hint, type) else True


def _dotted_items(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"connector": {"mm_projector": 5e-4}}`` -> ``{"connector.mm_projector": 5e-4}``."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out.update(_dotted_items(v, name) if isinstance(v, Mapping) and v else {name: v})
    return out


def _nesting_hint(key: str, value: Any, hint: Any) -> str:
    """For a ``dict[str, X]`` field that a dotted ``--cfg-options`` key split into nested dicts
    (``optim.lr_groups.connector.mm_projector=5e-4``): how to write the entry as one key."""
    if not isinstance(value, Mapping) or not any(isinstance(v, Mapping) for v in value.values()):
        return ""
    nested = _dotted_items({k: v for k, v in value.items() if isinstance(v, Mapping)})
    if not _type_ok(nested, hint):
        return ""
    return f"; a key with dots is one key: write {key}={nested!r}"


def _check_dataclass(spec: type, value: Any, key: str) -> list[Problem]:
    if not isinstance(value, Mapping):
        return [Problem(key, f"must be a dict of {spec.__name__} fields, got {type(value).__name__}")]
    hints = typing.get_type_hints(spec)
    names = [f.name for f in dataclasses.fields(spec)]
    out = []
    for k, v in value.items():
        if k not in names:
            hint = suggest(k, names)
            did = f" did you mean `{hint}`?" if hint else ""
            out.append(Problem(f"{key}.{k}", f"unknown key;{did} accepted: {', '.join(names)}"))
        elif not _type_ok(v, hints[k]):
            why = f"expected {_hint_name(hints[k])}, got {v!r}{_nesting_hint(f'{key}.{k}', v, hints[k])}"
            out.append(Problem(f"{key}.{k}", why))
    checker = getattr(spec, "value_problems", None)
    if checker is not None:
        typed = {k: v for k, v in value.items() if k in names and _type_ok(v, hints[k])}
        out += [Problem(f"{key}.{k}", msg) for k, msg in checker(typed)]
    return out


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_component(kind: str, value: Any, key: str, supplied: tuple[str, ...] = ()) -> list[Problem]:
    """Check one component dict against its registry and signature, recursing into declared children.

    ``supplied`` names keywords the enclosing component passes itself (a parent declares them per child in
    ``config_supplied = {"param": ("kw", ...)}``): they count as given, and the child's own ``check_config``
    is left to the parent's, which fills them in (and reports them when the config sets them).
    """
    registry = REGISTRIES[kind]
    if not isinstance(value, Mapping) or "type" not in value:
        return [Problem(key, f"must be a dict with a `type` naming a registered {registry.kind}")]
    kwargs = {k: v for k, v in value.items() if k != "type"}
    try:
        target = registry.lookup(value["type"])
    except BuildError as exc:
        return [Problem(f"{key}.type", str(exc))]
    out = []
    given = {**dict.fromkeys(supplied), **kwargs}
    for msg in check_kwargs(target, given, f"{registry.kind} {value['type']}"):
        bad = msg.split("`")[3] if "unexpected keyword" in msg or "missing the required" in msg else None
        out.append(Problem(f"{key}.{bad}" if bad else key, msg))
    children = getattr(target, "config_components", {}) or {}
    filled = getattr(target, "config_supplied", {}) or {}
    for param, child_kind in children.items():
        child = kwargs.get(param)
        if child is None:
            continue
        names = tuple(filled.get(param, ()))
        if isinstance(child, (list, tuple)):
            for i, item in enumerate(child):
                if isinstance(item, Mapping):
                    out += check_component(child_kind, item, f"{key}.{param}[{i}]", names)
        elif isinstance(child, Mapping):
            out += check_component(child_kind, child, f"{key}.{param}", names)
    checker = getattr(target, "check_config", None)
    if callable(checker) and not out and not supplied:
        try:
            out += [Problem(key, m) for m in checker(kwargs)]
        except Exception as exc:  # a checker bug must still say where it happened
            out.append(Problem(key, f"config check of {value['type']} raised {type(exc).__name__}: {exc}"))
    return out


def validate_tree(cfg: Mapping[str, Any]) -> list[Problem]:
    """Every problem in a resolved config dict (without file attribution)."""
    out: list[Problem] = []
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        spec = SECTIONS.get(key)
        if spec is None:
            hint = suggest(key, list(SECTIONS))
            did = f" did you mean `{hint}`?" if hint else ""
            out.append(
                Problem(key, f"unknown top-level key;{did} known sections: {', '.join(sorted(SECTIONS))}")
            )
        elif isinstance(spec, str):
            out += check_component(spec, value, key)
        elif dataclasses.is_dataclass(spec):
            if value is not None or key not in OPTIONAL_SECTIONS:
                out += _check_dataclass(spec, value, key)
        elif not any(_type_ok(value, t) for t in (spec if isinstance(spec, tuple) else (spec,))):
            out.append(Problem(key, f"expected {getattr(spec, '__name__', spec)}, got {value!r}"))
    return out
