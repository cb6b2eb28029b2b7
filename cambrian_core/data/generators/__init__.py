"""QA generators: turn a converted case into LLaVA caption / instruction records."""

from __future__ import annotations

from typing import Any

from cambrian_core.data.generators.base import Generator

__all__ = ["Generator", "register"]


def register(registries: Any) -> None:
    """Register the built-in generators (called through ``cambrian_core.builtin._COMPONENT_MODULES``)."""
