"""``cambrian demo --model ...``: one process, one model, a Gradio chat page for PNG / JPEG / DICOM / NIfTI."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from cambrian_core.serve.flags import demo_arguments

    p = sub.add_parser("demo", help="Gradio chat demo for one model (binds 127.0.0.1 unless --host)")
    demo_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from cambrian_core.serve.demo import run as run_demo

    try:
        return run_demo(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
