"""Plugin discovery through the ``cambrian.plugins`` entry-point group, loaded with pluggy.

Discovery runs once per process, the first time any registry is consulted. A plugin that fails to import is
recorded (name + error) and reported; the others still load. ``strict=True`` (``--strict`` on the command
line, or ``CAMBRIAN_STRICT_PLUGINS=1``) turns such a failure into an error.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import logging
import os
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pluggy

from cambrian_core import hookspecs

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginError",
    "PluginFailure",
    "call_each",
    "config_dirs",
    "current_provider",
    "ensure_loaded",
    "failures",
    "load_plugins",
    "plugin_manager",
    "record_failure",
]

ENTRY_POINT_GROUP = "cambrian.plugins"
log = logging.getLogger(__name__)


class PluginError(RuntimeError):
    """A plugin failed to load while strict loading was requested."""


@dataclass
class PluginFailure:
    """A plugin entry point that could not be imported or whose registration raised."""

    name: str
    distribution: str
    error: str
    traceback: str = field(repr=False, default="")

    def __str__(self) -> str:
        who = f"plugin `{self.name}` from {self.distribution}" if self.name else f"plugin {self.distribution}"
        return f"{who} failed: {self.error}"


_lock = threading.RLock()
#: ``loading``: the id of the thread running discovery (its own re-entrant lookups go through; others wait)
_state: dict[str, Any] = {"pm": None, "failures": [], "labels": {}, "loaded": False, "loading": None}
_provider = threading.local()


def current_provider() -> str:
    """The distribution whose hook is running now (``"<direct registration>"`` outside any plugin hook)."""
    return getattr(_provider, "name", None) or "<direct registration>"


@contextlib.contextmanager
def _providing(dist: str) -> Iterator[None]:
    prev = getattr(_provider, "name", None)
    _provider.name = dist
    try:
        yield
    finally:
        _provider.name = prev


def _dist_label(dist: Any) -> str:
    if dist is None:
        return "<unknown>"
    name = dist.metadata["Name"] if hasattr(dist, "metadata") else getattr(dist, "project_name", str(dist))
    return f"{name} {dist.version}"


def _entry_points() -> list[md.EntryPoint]:
    return list(md.entry_points(group=ENTRY_POINT_GROUP))


def _dist_name(ep: md.EntryPoint) -> str:
    return ep.dist.metadata["Name"] if ep.dist is not None else ""


def load_plugins(strict: bool | None = None, reload: bool = False) -> pluggy.PluginManager:
    """Discover and load every plugin; return the plugin manager.

    cambrian's own entry points load first, then the others by distribution name. Each entry point is
    registered under ``<distribution>:<entry point>``, so two packages may use the same entry-point name. A
    component name a plugin registers when another distribution already holds it is a recorded failure naming
    both (the first registration is kept, the plugin's other components still load).

    Args:
        strict: raise ``PluginError`` when any plugin fails (default: ``$CAMBRIAN_STRICT_PLUGINS``).
        reload: forget earlier discovery (registries are cleared, third-party plugin modules are imported
            again) and discover again, e.g. after a plugin package was installed or removed in this process.
    """
    from cambrian_core.registry import REGISTRIES

    if strict is None:
        strict = _strict_default()
    with _lock:
        if _state["loaded"] and not reload:
            if strict and _state["failures"]:
                raise PluginError("; ".join(map(str, _state["failures"])))
            return _state["pm"]
        if reload:
            for reg in REGISTRIES.values():
                reg.clear()
            _invalidate_import_caches()
            _forget_plugin_modules(_entry_points())
        _state.update(loading=threading.get_ident(), failures=[], labels={})
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        loaded: list[tuple[Any, str]] = []
        # one entry point at a time, so that one broken plugin cannot hide the others
        for ep in sorted(_entry_points(), key=lambda e: (_dist_name(e) != "cambrian", _dist_name(e), e.name)):
            label = _dist_label(ep.dist)
            try:
                with _providing(label):  # registrations made on import are attributed to the package
                    plugin = ep.load()
                pm.register(plugin, name=f"{_dist_name(ep)}:{ep.name}")
            except Exception as exc:  # a third-party plugin may raise anything on import
                record_failure(
                    PluginFailure(ep.name, label, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                )
                continue
            loaded.append((plugin, label))
            _state["labels"][id(plugin)] = label
        registries = SimpleNamespace(**REGISTRIES)
        impls = {id(impl.plugin): impl for impl in pm.hook.cambrian_register.get_hookimpls()}
        for plugin, label in loaded:
            impl = impls.get(id(plugin))
            if impl is None:
                continue
            try:
                with _providing(label):
                    impl.function(registries=registries)
            except Exception as exc:
                record_failure(
                    PluginFailure(
                        impl.plugin_name, label, f"{type(exc).__name__}: {exc}", traceback.format_exc()
                    )
                )
        _state.update(pm=pm, loaded=True, loading=None)
        if strict and _state["failures"]:
            raise PluginError("; ".join(map(str, _state["failures"])))
        return pm


def _strict_default() -> bool:
    return os.environ.get("CAMBRIAN_STRICT_PLUGINS", "") not in ("", "0")


def record_failure(failure: PluginFailure) -> None:
    """Add ``failure`` to the report of this process's plugins (and log it), once."""
    if any(str(f) == str(failure) for f in _state["failures"]):
        return  # a hook called again (config folders are asked for by every config load)
    _state["failures"].append(failure)
    log.warning("%s (the other plugins are loaded; pass --strict to make this fatal)", failure)


def in_plugin_hook() -> bool:
    """Whether a plugin's import or hook is running now (registrations are then attributed to it)."""
    return getattr(_provider, "name", None) is not None


def call_each(hook: str, strict: bool | None = None, **kwargs: Any) -> list[Any]:
    """Call hook ``hook`` of every plugin, each on its own: a plugin whose implementation raises is a recorded
    failure (``PluginError`` under ``strict``) and the others still run. Returns the results in load order."""
    pm = load_plugins(strict=strict)
    out = []
    for impl in getattr(pm.hook, hook).get_hookimpls():  # registration (= load) order
        label = _state["labels"].get(id(impl.plugin), "<unknown>")
        try:
            with _providing(label):
                out.append(impl.function(**kwargs))
        except Exception as exc:
            failure = PluginFailure(
                impl.plugin_name, label, f"{hook}: {type(exc).__name__}: {exc}", traceback.format_exc()
            )
            record_failure(failure)
            if strict if strict is not None else _strict_default():
                raise PluginError(str(failure)) from exc
    return out


def _invalidate_import_caches() -> None:
    """Make newly installed / removed distributions visible to ``importlib.metadata``."""
    import importlib
    import sys

    importlib.invalidate_caches()
    sys.path_importer_cache.clear()


def _forget_plugin_modules(eps: list[md.EntryPoint]) -> None:
    """Drop third-party plugin packages (each entry point's top-level package, submodules too) from
    ``sys.modules``, so that loading them again re-runs the registrations they make on import. cambrian's own
    plugins register through ``cambrian_register`` and stay imported (their classes keep their identity)."""
    import sys

    own = {ep.module.split(".")[0] for ep in eps if _dist_name(ep) == "cambrian"} | {"cambrian_core"}
    tops = {ep.module.split(".")[0] for ep in eps if _dist_name(ep) != "cambrian"} - own
    for name in [m for m in sys.modules if m.split(".")[0] in tops]:
        del sys.modules[name]


def ensure_loaded() -> None:
    """Run discovery unless it already ran. A call from inside discovery (a plugin looking a part up while it
    registers) is a no-op; a call from another thread meanwhile waits for discovery to finish."""
    if _state["loaded"] or _state["loading"] == threading.get_ident():
        return
    load_plugins()


def plugin_manager() -> pluggy.PluginManager:
    """The loaded plugin manager."""
    return load_plugins()


def failures() -> list[PluginFailure]:
    """Plugins that failed in the last discovery."""
    ensure_loaded()
    return list(_state["failures"])


def config_dirs() -> dict[str, str]:
    """``{scope: folder}`` contributed by every plugin through ``cambrian_config_dirs``."""
    out: dict[str, str] = {}
    for mapping in call_each("cambrian_config_dirs"):
        out.update(mapping or {})
    return out
