"""Command-line flags of every serving command, kept free of heavy imports so building the ``cambrian`` parser
stays fast (the servers import torch, FastAPI and Gradio only when they run)."""

from __future__ import annotations

import argparse

from cambrian_core.cli.argtypes import port, positive_float, positive_int
from cambrian_core.serve.protocol import CONTROLLER_HEART_BEAT_EXPIRATION, WORKER_HEART_BEAT_INTERVAL

__all__ = [
    "api_arguments",
    "controller_arguments",
    "demo_arguments",
    "placement_arguments",
    "web_arguments",
    "worker_arguments",
]

DISPATCH_METHODS = ("lottery", "shortest_queue")


def request_limit_arguments(p: argparse.ArgumentParser) -> None:
    """What one server accepts: queued requests, images per request, encoded size per image."""
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=256,
        help="requests waiting before 503 (default %(default)s)",
    )
    p.add_argument(
        "--max-images", type=positive_int, default=8, help="images per request (default %(default)s)"
    )
    p.add_argument(
        "--max-image-mb",
        type=positive_float,
        default=32.0,
        help="encoded size per image (default %(default)s)",
    )


def placement_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how a model loads: ``--device``, ``--dtype``, ``--load-8bit`` / ``--load-4bit`` and
    ``--tower-path`` (shared by every loader)."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument(
        "--load-8bit",
        dest="quantize",
        action="store_const",
        const=8,
        help="the LLM's linear layers in int8 (bitsandbytes LLM.int8; towers and connector keep --dtype)",
    )
    bits.add_argument(
        "--load-4bit",
        dest="quantize",
        action="store_const",
        const=4,
        help="the LLM's linear layers in 4-bit NF4 (bitsandbytes), computing in --dtype",
    )
    p.add_argument(
        "--tower-path",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="for a Cambrian-1 folder: local weights of a tower named in its config (repeat per tower)",
    )


def controller_arguments(p: argparse.ArgumentParser) -> None:
    """The controller's flags (LLaVA's, plus the heartbeat expiry)."""
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=port, default=21001)
    p.add_argument("--dispatch-method", choices=DISPATCH_METHODS, default="shortest_queue")
    p.add_argument(
        "--heart-beat-expiration",
        type=positive_float,
        default=CONTROLLER_HEART_BEAT_EXPIRATION,
        help="drop a worker after this many seconds without a heartbeat (default %(default)s)",
    )
    p.add_argument(
        "--worker-timeout",
        type=positive_float,
        default=600.0,
        help="seconds to wait for a worker's next stream chunk before giving up (default %(default)s)",
    )
    p.add_argument(
        "--max-body-mb",
        type=positive_float,
        default=None,
        help="largest request body in MiB (default: what a worker with default image limits accepts)",
    )


def worker_arguments(p: argparse.ArgumentParser, seed_flags: bool = True) -> None:
    """The worker's flags: LLaVA's (``--model-path`` / ``--controller-address`` / ``--worker-address`` and their
    README abbreviations) plus device, dtype, batching and image limits."""
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=port, default=21002)
    p.add_argument(
        "--worker-address",
        "--worker",
        dest="worker_address",
        default=None,
        help="URL clients reach this worker at (default http://HOST:PORT)",
    )
    p.add_argument(
        "--controller-address", "--controller", dest="controller_address", default="http://127.0.0.1:21001"
    )
    p.add_argument(
        "--model-path",
        "--model",
        dest="model_path",
        required=True,
        help="saved model folder, registered checkpoint name, or Cambrian-1 HF folder",
    )
    p.add_argument(
        "--model-name", default=None, help="name announced to the controller (default: from the path)"
    )
    placement_arguments(p)
    p.add_argument(
        "--limit-model-concurrency",
        type=positive_int,
        default=5,
        help="requests decoded together in one batch (default %(default)s)",
    )
    request_limit_arguments(p)
    p.add_argument("--no-register", action="store_true", help="do not register with a controller")
    p.add_argument(
        "--heart-beat-interval",
        type=positive_float,
        default=WORKER_HEART_BEAT_INTERVAL,
        help="seconds between heartbeats (default %(default)s)",
    )
    if seed_flags:
        p.add_argument("--model-base", default=None, help=argparse.SUPPRESS)
        p.add_argument("--multi-modal", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--stream-interval", type=int, default=1, help=argparse.SUPPRESS)


def web_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=port, default=7860)
    p.add_argument(
        "--controller-url", "--controller", dest="controller_url", default="http://127.0.0.1:21001"
    )
    p.add_argument("--concurrency-count", type=int, default=16)
    p.add_argument(
        "--model-list-mode",
        choices=["once", "reload"],
        default="once",
        help="list models once at start, or on every page load",
    )
    p.add_argument("--share", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--moderate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--embed", action="store_true", help=argparse.SUPPRESS)


def api_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "--model-path",
        dest="model",
        required=True,
        help="saved model folder, registered checkpoint name, or Cambrian-1 HF folder",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: from --model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` (default: $CAMBRIAN_API_KEY when set, else no key)",
    )
    p.add_argument(
        "--allow-local-files",
        action="store_true",
        help="accept image_url values that are paths on this machine (off by default)",
    )
    placement_arguments(p)
    p.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=8,
        help="requests decoded together (default %(default)s)",
    )
    request_limit_arguments(p)


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "--model-path",
        dest="model",
        required=True,
        help="saved model folder, registered checkpoint name, or Cambrian-1 HF folder",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=port, default=7860)
    placement_arguments(p)
    p.add_argument("--max-batch-size", type=positive_int, default=8)
