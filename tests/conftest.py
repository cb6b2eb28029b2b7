"""Test-wide settings: offline hubs, no analytics, and skips for hardware the machine lacks."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = _has_cuda()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    xla = os.environ.get("CAMBRIAN_XLA_PYTHON")
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "browser" in item.keywords and not chromium:
            item.add_marker(pytest.mark.skip(reason="needs Debian's chromium (apt-get install chromium)"))
        if "xla" in item.keywords and not xla:
            item.add_marker(pytest.mark.skip(reason="set CAMBRIAN_XLA_PYTHON to the torch_xla venv's python"))
