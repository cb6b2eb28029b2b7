"""Base class of dataset converters (registered in ``DATASETS``) and the whole-input error."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, Reject

__all__ = ["Converter", "LayoutError"]


class LayoutError(ValueError):
    """The input as a whole is unusable (missing folder, wrong layout); the message says what was expected."""


class Converter(abc.ABC):
    """Reads one source's release layout and yields :class:`Case` / :class:`Reject` objects in a stable order."""

    name: ClassVar[str]
    #: which versioned LLM prompt template the API generator uses for this source
    prompt_name: ClassVar[str] = "generic"
    #: licence tag carried in every record's provenance (``None``: unknown, check the source's terms)
    license: ClassVar[str | None] = None
    #: keywords every converter takes besides its own (``window``: CT/MR display window for all its scans)
    common_options: ClassVar[tuple[str, ...]] = ("window",)

    def __init__(self, src: str, views: Literal["single", "multi"] = "single", **options: Any) -> None:
        if views not in ("single", "multi"):
            raise ValueError(f"{type(self).__name__}: views must be 'single' or 'multi', got {views!r}")
        unknown = sorted(set(options) - set(self.common_options))
        if unknown:
            from cambrian_core.registry import suggest

            hints = [
                f" (did you mean `{h}`?)" if (h := suggest(k, list(self.common_options))) else ""
                for k in unknown
            ]
            raise ValueError(
                f"{type(self).__name__}: unknown option(s) "
                + ", ".join(f"`{k}`{h}" for k, h in zip(unknown, hints, strict=True))
                + f"; the options every source takes: {', '.join(self.common_options)} (see its keywords for the rest)"
            )
        self.src = str(src)
        self.views = views
        self.options = options

    @abc.abstractmethod
    def check_layout(self) -> None:
        """Raise :class:`LayoutError` naming the missing file/column and the expected layout."""

    @abc.abstractmethod
    def iter_cases(self) -> Iterator[Case | Reject]:
        """Yield every unit of the source, in a stable order; cheap (no pixel decoding here)."""

    def image_options(self, **defaults: Any) -> dict[str, Any]:
        """``defaults`` for an ``ImageRef``'s options, the user's ``window`` option (if any) taking precedence."""
        opts = dict(defaults)
        if self.options.get("window") is not None:
            opts["window"] = self.options["window"]
        return opts

    def caption(self, case: Case) -> str | None:
        """Stage-1 caption text for ``case`` (``None``: no caption record)."""
        return case.text.get("caption") or None

    def offline_qa(self, case: Case) -> list[tuple[str, str]]:
        """(question, answer) pairs built from structured labels, used by the offline ``template`` generator."""
        return []
