"""``cambrian plugins list``: every registered component by kind, with the distribution that provided it."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list plugins and the components they register")
    psub = p.add_subparsers(dest="plugins_command", metavar="ACTION")
    lst = psub.add_parser("list", help="print every component by kind with its providing distribution")
    lst.add_argument("--kind", help="only this kind (encoders, connectors, llms, ...)")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=run_list)
    p.set_defaults(func=lambda a: p.print_help() or 0)


def collect(kind: str | None = None) -> dict[str, list[dict[str, str]]]:
    """``{kind: [{name, provider}]}`` for every registry (or one)."""
    from cambrian_core.registry import REGISTRIES

    if kind is not None and kind not in REGISTRIES:
        print(f"error: unknown kind `{kind}`; kinds: {', '.join(REGISTRIES)}", file=sys.stderr)
        raise SystemExit(2)  # a usage error, as everywhere else
    out = {}
    for k, reg in REGISTRIES.items():
        if kind is None or k == kind:
            out[k] = [{"name": n, "provider": reg.providers.get(n, "<unknown>")} for n in reg.names()]
    return out


def run_list(args: argparse.Namespace) -> int:
    from cambrian_core.plugins import failures

    table = collect(args.kind)
    broken = failures()
    if args.json:
        print(json.dumps({"components": table, "failures": [str(f) for f in broken]}, indent=2))
        return 0
    for kind, rows in table.items():
        print(f"{kind} ({len(rows)})")
        width = max((len(r["name"]) for r in rows), default=0)
        for r in rows:
            print(f"  {r['name']:<{width}}  {r['provider']}")
    for f in broken:
        print(f"FAILED  {f}")
    return 0
