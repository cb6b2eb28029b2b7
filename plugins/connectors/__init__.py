"""Built-in connectors plugin: registered through the `cambrian.plugins` entry point like any third-party plugin."""

from __future__ import annotations

import importlib
from typing import Any

from cambrian_core import hookimpl

#: family modules of this plugin; each defines ``register(registries)``
FAMILIES: list[str] = ["sva", "mlp", "identity"]


@hookimpl
def cambrian_register(registries: Any) -> None:
    for name in FAMILIES:
        importlib.import_module(f"{__name__}.{name}").register(registries)
