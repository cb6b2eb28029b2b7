"""Built-in datasets plugin: registered through the `cambrian.plugins` entry point like any third-party plugin."""

from __future__ import annotations

import importlib
from typing import Any

from cambrian_core import hookimpl

#: family modules of this plugin; each defines ``register(registries)``
FAMILIES: list[str] = [
    "bundled_demo",
    "dicom_folder",
    "padchest",
    "deeplesion",
    "lld_mmri",
    "mama_mia",
    "pmc_oa",
    "quilt",
    "eurorad",
    "radiopaedia",
    "llava",
]


@hookimpl
def cambrian_register(registries: Any) -> None:
    for name in FAMILIES:
        importlib.import_module(f"{__name__}.{name}").register(registries)
