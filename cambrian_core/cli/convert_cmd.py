"""``cambrian convert SOURCE --src DIR --out DIR``: turn a medical dataset release into LLaVA JSONL, resumably."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cambrian_core.cli.argtypes import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a dataset release into LLaVA JSONL (resumable, parallel, shardable)",
        description="Convert SOURCE (a registered dataset converter, see `cambrian plugins list --kind datasets`) "
        "into OUT/records.jsonl + OUT/images/. Rerun the same command to continue an interrupted run.",
    )
    p.add_argument("source", metavar="SOURCE", help="dataset converter name, e.g. padchest, deeplesion")
    p.add_argument("--src", required=True, help="folder holding the source release")
    p.add_argument(
        "--out", required=True, help="output folder (records.jsonl, done.txt, rejects.jsonl, images/)"
    )
    p.add_argument("--generator", default="template", help="QA generator (default: template, offline)")
    p.add_argument("--gen-opt", action="append", default=[], metavar="KEY=VALUE", help="generator keyword")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="converter keyword")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--shard", default="0/1", metavar="i/n", help="process shard i of n (stable hash of case id)"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N cases of the shard")
    p.add_argument(
        "--views", choices=("single", "multi"), default="single", help="one image or all views per sample"
    )
    p.add_argument(
        "--window",
        default=None,
        help="window preset (lung, mediastinum, bone, brain, abdomen, liver), "
        "'center,width' (--window=-600,1500 for a negative centre), minmax or percentile; overrides the "
        "source's default",
    )
    p.add_argument(
        "--max-size", type=positive_int, default=None, help="shrink images so the longest side is at most N"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_kv(items: list[str], flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values are JSON when they parse as JSON, else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"error: {flag} expects KEY=VALUE, got {item!r}", file=sys.stderr)
            raise SystemExit(2)  # a usage error, as everywhere else
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    from cambrian_core.data.converter import LayoutError
    from cambrian_core.data.output_store import RunConflictError
    from cambrian_core.data.runner import RunStopped, convert, parse_shard
    from cambrian_core.data.windowing import resolve_window
    from cambrian_core.registry import DATASETS, GENERATORS, build

    try:
        shard = parse_shard(args.shard)
        if args.window is not None:
            resolve_window(args.window)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    src, out = Path(args.src).resolve(), Path(args.out).resolve()
    if out == src or (src.is_dir() and out.is_relative_to(src) and args.source == "llava"):
        print(
            f"error: --out {args.out} is inside --src {args.src}; write the converted data elsewhere",
            file=sys.stderr,
        )
        return 2
    conv_cfg = {"type": args.source, "src": args.src, "views": args.views, **parse_kv(args.opt, "--opt")}
    if args.window is not None:
        conv_cfg["window"] = args.window
    try:
        converter = build(DATASETS, conv_cfg)
        generator = build(GENERATORS, {"type": args.generator, **parse_kv(args.gen_opt, "--gen-opt")})
    except ValueError as exc:  # a converter's or generator's own check of its options
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = convert(
            converter,
            generator,
            args.out,
            workers=args.workers,
            shard=shard,
            limit=args.limit,
            progress=not args.no_progress,
            max_size=args.max_size,
        )
    except (LayoutError, RunConflictError, RunStopped) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: finished cases are saved in {args.out}; run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    print(summary.format())
    return 0
