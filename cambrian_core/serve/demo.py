"""``cambrian demo``: one process, one model, the Gradio chat UI on top of the in-process engine."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from typing import Any

from PIL import Image

from cambrian_core.serve.engine import EngineError, InferenceEngine, SamplingParams
from cambrian_core.serve.ui import BackendError, build_blocks, launch

__all__ = ["EngineBackend", "build_demo", "run"]

log = logging.getLogger(__name__)


class EngineBackend:
    """Answers from an :class:`InferenceEngine` in this process."""

    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine

    def models(self) -> list[str]:
        return [self.engine.name]

    def stream(
        self, model: str, messages: list[dict[str, str]], images: list[Image.Image], params: dict[str, Any]
    ) -> Iterator[str]:
        if model != self.engine.name:
            raise BackendError(f"this demo serves {self.engine.name!r}, not {model!r}")
        handle = self.engine.submit_chat(messages, images, SamplingParams(**params))
        try:
            yield from handle.stream(timeout=600)
        except (EngineError, TimeoutError) as exc:
            raise BackendError(str(exc)) from exc
        finally:
            handle.cancel()  # no-op once finished; stops decoding when the browser went away


def build_demo(engine: InferenceEngine) -> Any:
    """The demo's Gradio Blocks for ``engine``."""
    return build_blocks(EngineBackend(engine), title=f"cambrian demo: {engine.name}", reload_models=False)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve the demo until interrupted."""
    from cambrian_core.serve.loading import load_for_serving, model_display_name

    model = load_for_serving(args.model, args.device, args.dtype, args.tower_path, args.quantize)
    engine = InferenceEngine(model, name=model_display_name(args.model), max_batch_size=args.max_batch_size)
    try:
        launch(build_demo(engine), args.host, args.port, block=True)
    finally:
        engine.shutdown()
    return 0
