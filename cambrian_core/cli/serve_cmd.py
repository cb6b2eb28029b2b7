"""``cambrian serve controller|worker|web|api``: the LLaVA-protocol services and the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from cambrian_core.serve import flags

#: action -> (module that runs it, its flags, help)
_ACTIONS = {
    "controller": (
        "cambrian_core.serve.controller",
        flags.controller_arguments,
        "register workers and dispatch requests (LLaVA protocol)",
    ),
    "worker": (
        "cambrian_core.serve.model_worker",
        flags.worker_arguments,
        "serve one model to a controller (LLaVA protocol)",
    ),
    "web": (
        "cambrian_core.serve.gradio_web_server",
        flags.web_arguments,
        "Gradio chat UI over every model a controller knows",
    ),
    "api": (
        "cambrian_core.serve.openai_api",
        flags.api_arguments,
        "OpenAI-compatible /v1/chat/completions for one model",
    ),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models: controller, worker, web UI, OpenAI-compatible API")
    psub = p.add_subparsers(dest="serve_command", metavar="ACTION")
    for action, (module, add_flags, help_text) in _ACTIONS.items():
        q = psub.add_parser(action, help=help_text)
        add_flags(q)
        q.set_defaults(func=_runner(module))
    p.set_defaults(func=lambda a: p.print_help() or 0)


def _runner(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from cambrian_core.serve.errors import RequestError

        logging.getLogger("cambrian_core.serve").setLevel(logging.INFO)
        try:
            return int(importlib.import_module(module).run(args) or 0)
        except (ValueError, RequestError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run
