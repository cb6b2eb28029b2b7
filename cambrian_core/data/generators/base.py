"""Base class of QA generators (registered in ``GENERATORS``)."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

from cambrian_core.data.case import Case
from cambrian_core.data.converter import Converter

__all__ = ["CaseRejected", "Generator", "StopRun"]


class StopRun(RuntimeError):
    """No later case can succeed either (rejected credentials, wrong endpoint or model): the runner commits what
    is finished and stops instead of failing case after case."""


class CaseRejected(Exception):
    """This case can never give a usable record (a rerun would not help): the runner records it as a reject of
    kind ``generator``, not retried. Other errors (network, API) are recorded for a rerun to retry."""


class Generator(abc.ABC):
    """Turns a case and its rendered PNGs into LLaVA records."""

    name: ClassVar[str]
    prompt_version: str = "1"
    #: cases one process generates at once (threads); I/O-bound generators (remote APIs) set it higher
    concurrency: int = 1

    @abc.abstractmethod
    def generate(self, converter: Converter, case: Case, images: list[Path]) -> list[dict]:
        """LLaVA records WITHOUT id/provenance.

        Each is ``{"image": [...rel paths...] or str, "conversations": [...], "stage": "caption"|"instruct"}``;
        the runner adds ``id`` and ``provenance``.
        """
