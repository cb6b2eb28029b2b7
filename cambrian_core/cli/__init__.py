"""The ``cambrian`` command line: one command, subcommands contributed by the core and by plugins."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main", "train_main"]

#: core subcommand modules; each defines ``add_parser(subparsers)``
_CORE_COMMANDS = [
    "cambrian_core.cli.plugins_cmd",
    "cambrian_core.cli.config_cmd",
    "cambrian_core.cli.convert_cmd",
    "cambrian_core.cli.data_cmd",
    "cambrian_core.cli.train_cmd",
    "cambrian_core.cli.models_cmd",
    "cambrian_core.cli.export_cmd",
    "cambrian_core.cli.infer_cmd",
    "cambrian_core.cli.serve_cmd",
    "cambrian_core.cli.demo_cmd",
    "cambrian_core.cli.eval_cmd",
]


def build_parser(strict: bool | None = None) -> argparse.ArgumentParser:
    """The full parser: core subcommands plus every plugin's ``cambrian_cli_commands`` (``strict``: a failing
    plugin is an error; ``None``: as ``$CAMBRIAN_STRICT_PLUGINS`` says)."""
    from cambrian_core import plugins

    parser = argparse.ArgumentParser(
        prog="cambrian",
        description="Build, train, evaluate and serve Cambrian-style multimodal LLMs.",
    )
    parser.add_argument("--strict", action="store_true", help="fail when any plugin cannot be loaded")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _CORE_COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    plugins.call_each("cambrian_cli_commands", strict=strict, subparsers=sub)  # a failing one is reported
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cambrian``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # global flag, needed before the parser (which plugins extend) exists; absent: $CAMBRIAN_STRICT_PLUGINS
    strict = True if "--strict" in argv else None
    logging.basicConfig(
        level=logging.DEBUG if ("-v" in argv or "--verbose" in argv) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from cambrian_core.cpu_allocator import tune_cpu_allocator
    from cambrian_core.plugins import PluginError

    tune_cpu_allocator()  # large CPU tensors without a page fault per allocation (CAMBRIAN_CPU_ALLOCATOR)
    try:
        parser = build_parser(strict=strict)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to fix: printed as ``error: ...`` with exit status 2, no traceback."""
    from cambrian_core.config import ConfigError
    from cambrian_core.model.io import ModelFileError
    from cambrian_core.model.quantize import MissingPackageError
    from cambrian_core.registry import BuildError
    from cambrian_core.train.checkpoint import CheckpointError
    from cambrian_core.train.feature_cache import StaleCacheError

    files = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
    return (
        ConfigError,
        BuildError,
        CheckpointError,
        StaleCacheError,
        ModelFileError,
        MissingPackageError,
        *files,
    )


def train_main(argv: Sequence[str] | None = None) -> int:
    """``cambrian-train CONFIG ...``: the seed recipe's command, same as ``cambrian train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["train", *argv])
