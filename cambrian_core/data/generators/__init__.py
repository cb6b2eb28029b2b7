"""QA generators: turn a converted case into LLaVA caption / instruction records."""

from __future__ import annotations

from typing import Any

from cambrian_core.data.generators.base import Generator

__all__ = ["Generator", "register"]


def register(registries: Any) -> None:
    """Register the built-in generators (called through ``cambrian_core.builtin._COMPONENT_MODULES``)."""
    from cambrian_core.data.generators.template import TemplateGenerator

    registries.generators.register_module(name="template", module=TemplateGenerator)
    from cambrian_core.data.generators.openai_chat import OpenAIGenerator

    registries.generators.register_module(name="openai", module=OpenAIGenerator)
