"""The core's own plugin: the composed model, runners, metrics, generators and the built-in config folder.

It is reached through the ``cambrian.plugins`` entry point ``core`` exactly like any third-party plugin.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from cambrian_core.hookspecs import hookimpl

#: modules whose ``register(registries)`` adds core components; each is imported only when discovery runs
_COMPONENT_MODULES: list[str] = [
    "cambrian_core.model.cambrian",
    "cambrian_core.model.checkpoints",
    "cambrian_core.data.generators",
    "cambrian_core.train.runners.single",
    "cambrian_core.train.runners.fsdp",
    "cambrian_core.train.runners.deepspeed",
    "cambrian_core.train.runners.xla",
    "cambrian_core.eval.metrics",
]


def _config_dir() -> Path:
    """``configs/`` of a checkout (editable install), else the ``cambrian_configs`` data package of a wheel."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    spec = importlib.util.find_spec("cambrian_configs")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else checkout


CONFIG_DIR = _config_dir()


@hookimpl
def cambrian_register(registries: Any) -> None:
    for name in _COMPONENT_MODULES:
        importlib.import_module(name).register(registries)


@hookimpl
def cambrian_config_dirs() -> dict[str, str]:
    return {"cambrian": str(CONFIG_DIR)} if CONFIG_DIR.is_dir() else {}
