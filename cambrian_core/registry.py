"""The registry tree: one mmengine ``Registry`` per component kind.

Every part of a model, data pipeline or training run is built from a config dict whose ``type`` names a
registered component. Components are registered by plugins (built-in and third-party alike) through the
``cambrian.plugins`` entry-point group; looking anything up first makes sure discovery has run, so no
component depends on some import having happened first.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import Registry

__all__ = [
    "CONNECTORS",
    "DATASETS",
    "ENCODERS",
    "GENERATORS",
    "LLMS",
    "METRICS",
    "MODELS",
    "REGISTRIES",
    "RUNNERS",
    "TEMPLATES",
    "BuildError",
    "CambrianRegistry",
    "build",
    "check_kwargs",
    "suggest",
]


class BuildError(KeyError, TypeError):
    """A config dict could not be turned into a component (unknown type or bad keyword).

    Subclasses both ``KeyError`` (what mmengine raises for unknown types) and ``TypeError`` (what Python
    raises for bad keywords) so callers catching either keep working.
    """

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


def suggest(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """Return the closest of ``choices`` to ``name``, or ``None`` when nothing is close."""
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hits[0]] if hits else None


def accepted_kwargs(target: Callable[..., Any]) -> tuple[list[str], bool]:
    """Keyword names ``target`` accepts, and whether it also takes ``**kwargs``."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return [], True
    names, var_kw = [], False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
            names.append(p.name)
    return names, var_kw


def check_kwargs(target: Callable[..., Any], kwargs: Mapping[str, Any], component: str) -> list[str]:
    """Problems with ``kwargs`` for ``target``: unknown keys (with suggestions) and missing required ones."""
    names, var_kw = accepted_kwargs(target)
    problems = []
    if not var_kw:
        for key in kwargs:
            if key not in names:
                hint = suggest(key, names)
                did = f" (did you mean `{hint}`?)" if hint else ""
                problems.append(
                    f"`{component}` got an unexpected keyword `{key}`{did}; accepted: {', '.join(names) or 'none'}"
                )
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return problems
    for p in sig.parameters.values():
        if (
            p.name != "self"
            and p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in kwargs
        ):
            problems.append(f"`{component}` is missing the required keyword `{p.name}`")
    return problems


class CambrianRegistry(Registry):
    """An mmengine ``Registry`` that triggers plugin discovery, records providers and explains failures."""

    def __init__(self, name: str, kind: str, parent: Registry | None = None, **kwargs: Any) -> None:
        super().__init__(name, build_func=_build_from_cfg, parent=parent, scope="cambrian", **kwargs)
        self.kind = kind
        #: registered name -> distribution that registered it ("name version")
        self.providers: dict[str, str] = {}

    def _register_module(self, module: Any, module_name: Any = None, force: bool = False) -> None:
        from cambrian_core import plugins  # local: plugins imports this module

        names = module_name if isinstance(module_name, (list, tuple)) else [module_name or module.__name__]
        if not force and plugins.in_plugin_hook():  # a plugin may not take a name another one holds
            for n in [n for n in names if n in self._module_dict]:
                plugins.record_failure(
                    plugins.PluginFailure(
                        "",
                        plugins.current_provider(),
                        f"{self.kind} `{n}` clashes with the one from {self.providers.get(n, '?')}, which is kept; "
                        "register it under another name",
                    )
                )
            names = [n for n in names if n not in self._module_dict]
            if not names:
                return
        super()._register_module(module=module, module_name=list(names), force=force)
        for n in names:
            self.providers[n] = plugins.current_provider()

    def get(self, key: str) -> Any:
        from cambrian_core import plugins

        plugins.ensure_loaded()
        return super().get(key)

    def names(self) -> list[str]:
        """Sorted names of every registered component (after discovery)."""
        from cambrian_core import plugins

        plugins.ensure_loaded()
        return sorted(self._module_dict)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def clear(self) -> None:
        """Forget every registration (used when discovery is re-run)."""
        self._module_dict.clear()
        self.providers.clear()

    def lookup(self, type_name: Any) -> Any:
        """Resolve ``type_name`` (a registered name, or a class/function used directly) or raise ``BuildError``."""
        if not isinstance(type_name, str):
            if callable(type_name):
                return type_name
            raise BuildError(
                f"`type` must be a registered name or a callable, got {type_name!r} ({self.kind})"
            )
        # Only names registered here count: mmengine's ``get`` would otherwise import any module or object
        # whose dotted path happens to match (``"openai"`` would return the openai package).
        target = self._module_dict.get(type_name) if type_name in self.names() else None
        if target is None:
            names = self.names()
            hint = suggest(type_name, names)
            did = f" Did you mean `{hint}`?" if hint else ""
            listing = ", ".join(names) if names else "(nothing registered)"
            raise BuildError(
                f"Unknown {self.kind} type `{type_name}` in the `{self.name}` registry.{did} "
                f"Registered {self.kind}s: {listing}. A third-party component appears here once its package "
                f"is installed (entry-point group `cambrian.plugins`); see `cambrian plugins list`."
            )
        return target


def _build_from_cfg(
    cfg: Any, registry: CambrianRegistry, default_args: Mapping[str, Any] | None = None
) -> Any:
    """``build_func`` for every cambrian registry: ``type`` lookup + keyword check + call."""
    if not isinstance(cfg, Mapping):
        raise BuildError(
            f"A {registry.kind} config must be a dict with a `type` key, got {type(cfg).__name__}"
        )
    args = dict(cfg)
    for k, v in (default_args or {}).items():
        args.setdefault(k, v)
    if "type" not in args:
        raise BuildError(
            f"A {registry.kind} config needs a `type` key naming one of: {', '.join(registry.names())}; got keys "
            f"{sorted(args)}"
        )
    type_name = args.pop("type")
    target = registry.lookup(type_name)
    label = type_name if isinstance(type_name, str) else getattr(target, "__name__", str(target))
    problems = check_kwargs(target, args, f"{registry.kind} {label}")
    if problems:
        raise BuildError("; ".join(problems))
    return target(**args)


def build(registry: CambrianRegistry, cfg: Mapping[str, Any], **default_args: Any) -> Any:
    """Build one component from ``cfg`` (``type`` + keywords) in ``registry``."""
    return registry.build(cfg, default_args=default_args or None)


ENCODERS = CambrianRegistry("encoder", kind="encoder")
CONNECTORS = CambrianRegistry("connector", kind="connector")
LLMS = CambrianRegistry("llm", kind="LLM")
MODELS = CambrianRegistry("model", kind="model", parent=MMENGINE_MODELS)
TEMPLATES = CambrianRegistry("template", kind="chat template")
DATASETS = CambrianRegistry("dataset", kind="dataset converter", parent=MMENGINE_DATASETS)
GENERATORS = CambrianRegistry("generator", kind="QA generator")
RUNNERS = CambrianRegistry("runner", kind="runner", parent=MMENGINE_RUNNERS)
METRICS = CambrianRegistry("metric", kind="metric", parent=MMENGINE_METRICS)
CHECKPOINTS = CambrianRegistry("checkpoint", kind="named checkpoint")

#: kind name (as used in ``cambrian plugins list`` and in plugin hooks) -> registry
REGISTRIES: dict[str, CambrianRegistry] = {
    "encoders": ENCODERS,
    "connectors": CONNECTORS,
    "llms": LLMS,
    "models": MODELS,
    "templates": TEMPLATES,
    "datasets": DATASETS,
    "generators": GENERATORS,
    "runners": RUNNERS,
    "metrics": METRICS,
    "checkpoints": CHECKPOINTS,
}
