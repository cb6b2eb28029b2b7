"""``cambrian config show|diff|list``: the resolved config, what an ablation changes, what configs exist."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show, compare and list configs")
    psub = p.add_subparsers(dest="config_command", metavar="ACTION")
    show = psub.add_parser(
        "show", help="print the resolved config (bases merged, overrides applied, checked)"
    )
    show.add_argument("config", help="config file, or scope::path as `config list` prints it")
    show.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override keys")
    show.add_argument("--no-check", action="store_true", help="print even if the config has problems")
    show.set_defaults(func=run_show)
    diff = psub.add_parser("diff", help="show the keys that differ between two resolved configs")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.set_defaults(func=run_diff)
    lst = psub.add_parser("list", help="list the configs of every config scope (built-in and plugins)")
    lst.add_argument("pattern", nargs="?", default="", help="substring of the listed scope::path names")
    lst.set_defaults(func=run_list)
    p.set_defaults(func=lambda a: p.print_help() or 0)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a.b": 1, "c[0].d": 2}``."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping) and tree:  # an empty dict is a value of its own ({} is not "absent")
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = (
            list(tree) if isinstance(tree, tuple) else dict(tree) if isinstance(tree, Mapping) else tree
        )
    return out


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, value_in_a, value_in_b)]`` for every flattened key that differs (missing = ``<absent>``)."""
    fa, fb = flatten(a), flatten(b)
    absent = "<absent>"
    return [
        (k, fa.get(k, absent), fb.get(k, absent))
        for k in sorted(fa.keys() | fb.keys())
        if fa.get(k, absent) != fb.get(k, absent)
    ]


def run_show(args: argparse.Namespace) -> int:
    from cambrian_core.config import load_config

    cfg = load_config(args.config, args.cfg_options, validate=not args.no_check)
    print(cfg.pretty_text)
    return 0


def run_diff(args: argparse.Namespace) -> int:
    from cambrian_core.config import load_config

    a = load_config(args.a, validate=False).to_dict()
    b = load_config(args.b, validate=False).to_dict()
    rows = diff_configs(a, b)
    if not rows:
        print("no differences")
        return 0
    width = max(len(k) for k, _, _ in rows)
    print(f"{'key':<{width}}  {os.path.basename(args.a)} -> {os.path.basename(args.b)}")
    for k, va, vb in rows:
        print(f"{k:<{width}}  {va!r} -> {vb!r}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from cambrian_core.plugins import config_dirs

    for scope, folder in sorted(config_dirs().items()):
        for root, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                name = f"{scope}::{os.path.relpath(os.path.join(root, f), folder)}"
                if f.endswith(".py") and args.pattern in name:  # `ablations`, `demo/`, `cambrian::` all match
                    print(name)
    return 0
