"""Hook specifications every cambrian plugin may implement (pluggy).

A plugin is any module or object reachable through the ``cambrian.plugins`` entry-point group that
implements some of these hooks with ``@cambrian_core.hookimpl``. The built-in encoders, connectors, LLMs
and dataset converters are plugins of exactly this kind.
"""

from __future__ import annotations

import argparse
from typing import Any

import pluggy

PROJECT = "cambrian"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def cambrian_register(registries: Any) -> None:
    """Register components. ``registries`` has one attribute per kind (``registries.encoders`` ...).

    Call ``registries.encoders.register_module(name="my_encoder", module=MyEncoder)`` and friends.
    """


@hookspec
def cambrian_config_dirs() -> dict[str, str]:
    """Return ``{scope: folder}``: config folders usable as ``_base_`` through ``"scope::path/to.py"``."""


@hookspec
def cambrian_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``cambrian`` command line (``subparsers.add_parser(...)``).

    Each parser must set a ``func`` default taking the parsed ``argparse.Namespace``.
    """
