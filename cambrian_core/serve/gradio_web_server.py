"""The web UI in front of a controller: every model any worker serves, in one chat page (reference §E.4).

``python -m cambrian_core.serve.gradio_web_server --controller-url http://127.0.0.1:21001 --model-list-mode reload``

The page renders the uploaded scan itself (window / slice) and sends the worker PNGs and role / content turns
(``messages``), so the worker applies its own model's chat template: no template is guessed from a model name.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
from PIL import Image

from cambrian_core.serve.errors import ErrorCode
from cambrian_core.serve.flags import web_arguments
from cambrian_core.serve.protocol import NulChunker
from cambrian_core.serve.ui import BackendError, build_blocks, launch

__all__ = ["ControllerBackend", "main"]

log = logging.getLogger(__name__)


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ControllerBackend:
    """Answers from whichever worker the controller picks for the chosen model."""

    def __init__(self, controller_url: str, timeout: float = 600.0) -> None:
        self.controller_url = controller_url.rstrip("/")
        self.timeout = timeout

    def models(self) -> list[str]:
        try:
            httpx.post(self.controller_url + "/refresh_all_workers", timeout=30)
            return list(httpx.post(self.controller_url + "/list_models", timeout=10).json()["models"])
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("could not list models from %s: %s", self.controller_url, exc)
            return []

    def stream(
        self, model: str, messages: list[dict[str, str]], images: list[Image.Image], params: dict[str, Any]
    ) -> Iterator[str]:
        try:
            address = httpx.post(
                self.controller_url + "/get_worker_address", json={"model": model}, timeout=10
            ).json()["address"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise BackendError(f"the controller at {self.controller_url} did not answer ({exc})") from exc
        if not address:
            raise BackendError(f"no worker serves {model!r} now; reload the page to refresh the model list")
        body = {
            "model": model,
            "messages": messages,
            "images": [_png_b64(im) for im in images],
            "echo": False,
            **params,
        }
        sent = ""
        try:
            with httpx.stream(
                "POST",
                address + "/worker_generate_stream",
                json=body,
                timeout=httpx.Timeout(self.timeout, connect=10),
            ) as r:
                if r.status_code != 200:
                    r.read()
                    try:
                        detail = r.json().get("text", r.text)
                    except ValueError:
                        detail = r.text
                    raise BackendError(f"the worker refused the request (HTTP {r.status_code}): {detail}")
                cutter = NulChunker()
                for data in r.iter_raw():
                    for c in cutter.feed(data):
                        msg = json.loads(c[:-1])
                        if msg.get("error_code", 0) != ErrorCode.OK:
                            raise BackendError(f"{msg.get('text', '')} (error code {msg.get('error_code')})")
                        text = msg["text"]
                        if len(text) > len(sent):
                            yield text[len(sent) :]
                            sent = text
        except httpx.HTTPError as exc:
            raise BackendError(
                f"the worker at {address} stopped answering ({type(exc).__name__}); error code "
                f"{int(ErrorCode.WORKER_TIMEOUT)}"
            ) from exc


def build_web(args: argparse.Namespace) -> Any:
    if args.share:
        raise SystemExit("--share (a public gradio.live link) is not supported; bind with --host instead")
    if args.moderate:
        raise SystemExit("--moderate (OpenAI's moderation API) is not supported")
    backend = ControllerBackend(args.controller_url)
    return build_blocks(backend, title="cambrian", reload_models=args.model_list_mode == "reload")


def run(args: argparse.Namespace) -> int:
    launch(build_web(args), args.host, args.port, block=True, concurrency=args.concurrency_count)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m cambrian_core.serve.gradio_web_server", description=__doc__.split("\n")[0]
    )
    web_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
