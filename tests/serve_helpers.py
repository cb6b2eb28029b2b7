"""Shared pieces of the serving tests: tiny random models saved to folders, images as bytes and data URLs."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def tiny_config(seed_width: int = 32) -> dict[str, Any]:
    """A two-tower SVA model with the tiny llama3 LLM, all built from registered parts (no test-only types)."""
    from cambrian_core import CONNECTORS, ENCODERS, LLMS

    return {
        "type": "cambrian",
        "vision_tower_aux_list": [
            {"type": "clip", **ENCODERS.get("clip").tiny_config(), "token_len": 16},
            {"type": "siglip", **ENCODERS.get("siglip").tiny_config(), "token_len": 16},
        ],
        "image_token_len": 4,
        "connector": {"type": "sva", **CONNECTORS.get("sva").tiny_config()},
        "llm": {"type": "llama3", **LLMS.get("llama3").tiny_config()},
    }


def save_tiny_model(folder: Path, seed: int = 2) -> str:
    """Build the tiny model with ``seed`` and save it to ``folder``; returns the folder."""
    import torch

    from cambrian_core import MODELS, build

    torch.manual_seed(seed)
    model = build(MODELS, tiny_config())
    model.save_pretrained(str(folder))
    return str(folder)


def image(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def png_bytes(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    image(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def ct_small() -> str:
    """pydicom's CT test file (ships with pydicom)."""
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")
