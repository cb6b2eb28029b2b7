"""Base class of dataset converters (registered in ``DATASETS``) and the whole-input error."""

from __future__ import annotations

import abc
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from cambrian_core.data.case import Case, Reject

__all__ = ["Converter", "LayoutError"]


def _stable_repr(value: Any) -> str:
    """``repr`` that is the same in every process: no memory address (functions, objects), sets sorted."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(map(_stable_repr, value))) + "}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


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

    def __new__(cls, *args: Any, **kwargs: Any) -> Converter:
        obj = super().__new__(cls)
        # the call, for :meth:`arguments` (unpickling calls __new__ bare, then restores this attribute)
        obj._init_call = (args, kwargs)
        return obj

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

    def arguments(self) -> dict[str, str]:
        """Every constructor argument, defaults filled in, as ``repr`` strings (``src``: the resolved path when it
        exists); recorded in the run settings, so an output folder cannot be resumed with other converter settings.
        """
        args, kwargs = self._init_call
        signature = inspect.signature(type(self).__init__)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        out: dict[str, str] = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                out.update((k, _stable_repr(v)) for k, v in value.items())
            else:
                out[name] = _stable_repr(value)
        src = Path(self.src)
        out["src"] = str(src.resolve()) if src.exists() else str(self.src)  # e.g. bundled_demo's "auto"
        return dict(sorted(out.items()))

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
