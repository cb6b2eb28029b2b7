"""The plugin object cambrian loads through the ``cambrian.plugins`` entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cambrian_core import hookimpl


@hookimpl
def cambrian_register(registries: Any) -> None:
    from cambrian_plugin_example.converter import CaptionedFolder
    from cambrian_plugin_example.encoder import PatchConvEncoder

    registries.encoders.register_module(name="patch_conv", module=PatchConvEncoder)
    registries.datasets.register_module(name="captioned_folder", module=CaptionedFolder)


@hookimpl
def cambrian_config_dirs() -> dict[str, str]:
    return {"example": str(Path(__file__).parent / "configs")}
