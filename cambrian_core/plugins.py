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
    "config_dirs",
    "current_provider",
    "ensure_loaded",
    "failures",
    "load_plugins",
    "plugin_manager",
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
        return f"plugin `{self.name}` from {self.distribution} failed: {self.error}"


_lock = threading.RLock()
_state: dict[str, Any] = {"pm": None, "failures": [], "loaded": False, "loading": False}
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


def load_plugins(strict: bool | None = None, reload: bool = False) -> pluggy.PluginManager:
    """Discover and load every plugin; return the plugin manager.

    Args:
        strict: raise ``PluginError`` when any plugin fails (default: ``$CAMBRIAN_STRICT_PLUGINS``).
        reload: forget earlier discovery (registries are cleared) and discover again, e.g. after a
            plugin package was installed or removed in this process.
    """
    from cambrian_core.registry import REGISTRIES

    if strict is None:
        strict = os.environ.get("CAMBRIAN_STRICT_PLUGINS", "") not in ("", "0")
    with _lock:
        if _state["loaded"] and not reload:
            if strict and _state["failures"]:
                raise PluginError("; ".join(map(str, _state["failures"])))
            return _state["pm"]
        if reload:
            for reg in REGISTRIES.values():
                reg.clear()
            _invalidate_import_caches()
        _state["loading"] = True
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        failures: list[PluginFailure] = []
        # pluggy's own loader: it imports each entry point and records its distribution; we load one
        # entry point at a time so that one broken plugin cannot hide the others.
        for ep in sorted(_entry_points(), key=lambda e: (e.dist.metadata["Name"] if e.dist else "", e.name)):
            label = _dist_label(ep.dist)
            try:
                _load_one(pm, ep)
            except Exception as exc:  # a third-party plugin may raise anything on import
                failures.append(
                    PluginFailure(ep.name, label, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                )
        dists = {id(plugin): _dist_label(dist) for plugin, dist in pm.list_plugin_distinfo()}
        registries = SimpleNamespace(**REGISTRIES)
        for impl in pm.hook.cambrian_register.get_hookimpls():
            label = dists.get(id(impl.plugin), "<unknown>")
            try:
                with _providing(label):
                    impl.function(registries=registries)
            except Exception as exc:
                failures.append(
                    PluginFailure(
                        impl.plugin_name, label, f"{type(exc).__name__}: {exc}", traceback.format_exc()
                    )
                )
        _state.update(pm=pm, failures=failures, loaded=True, loading=False)
        for f in failures:
            log.warning("%s (the other plugins are loaded; pass --strict to make this fatal)", f)
        if strict and failures:
            raise PluginError("; ".join(map(str, failures)))
        return pm


def _invalidate_import_caches() -> None:
    """Make newly installed / removed distributions visible to ``importlib.metadata``."""
    import importlib
    import sys

    importlib.invalidate_caches()
    sys.path_importer_cache.clear()


def _load_one(pm: pluggy.PluginManager, ep: md.EntryPoint) -> None:
    """Load one entry point through pluggy's ``load_setuptools_entrypoints`` (filtered by name)."""
    if pm.get_plugin(ep.name) is not None:
        owner = next(
            (_dist_label(d) for p, d in pm.list_plugin_distinfo() if p is pm.get_plugin(ep.name)), "?"
        )
        raise PluginError(f"entry-point name `{ep.name}` is already taken by {owner}; rename the entry point")
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)


def ensure_loaded() -> None:
    """Run discovery unless it already ran (re-entrant calls during discovery are no-ops)."""
    if not _state["loaded"] and not _state["loading"]:
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
    for mapping in plugin_manager().hook.cambrian_config_dirs():
        out.update(mapping or {})
    return out
