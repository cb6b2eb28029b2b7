"""``cambrian models list``: every named checkpoint, its weight source and whether it loads offline here."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="named checkpoints (loadable by name wherever a model folder is accepted)"
    )
    psub = p.add_subparsers(dest="models_command", metavar="ACTION")
    lst = psub.add_parser("list", help="each named checkpoint with its source and offline availability")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=run_list)
    p.set_defaults(func=lambda a: p.print_help() or 0)


def collect() -> list[dict[str, object]]:
    """``[{name, source, available, why, description, provider}]`` for every registered checkpoint."""
    from cambrian_core.model.checkpoints import get_checkpoint
    from cambrian_core.registry import CHECKPOINTS

    rows = []
    for name in CHECKPOINTS.names():
        try:
            ckpt = get_checkpoint(name)
            ok, why = ckpt.availability()
            source, description = ckpt.source, ckpt.description
        except Exception as exc:  # a plugin's broken entry must not hide the others
            ok, why, source, description = False, f"broken entry: {type(exc).__name__}: {exc}", "?", ""
        rows.append(
            {
                "name": name,
                "source": source,
                "available": ok,
                "why": why,
                "description": description,
                "provider": CHECKPOINTS.providers.get(name, "<unknown>"),
            }
        )
    return rows


def run_list(args: argparse.Namespace) -> int:
    rows = collect()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no named checkpoints registered")
        return 0
    width = max(len(str(r["name"])) for r in rows)
    for r in rows:
        flag = "available offline" if r["available"] else "NOT available offline"
        print(f"{r['name']:<{width}}  {flag}: {r['why']}")
        print(f"{'':<{width}}  source: {r['source']}  ({r['provider']})")
        if r["description"]:
            print(f"{'':<{width}}  {r['description']}")
    return 0
