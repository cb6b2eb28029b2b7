"""The medical data engine: image I/O, dataset converters, QA generators and the resumable conversion runner.

A converter (``DATASETS`` registry) turns one source's release layout into :class:`~cambrian_core.data.case.Case`
objects; a generator (``GENERATORS`` registry) turns a case plus its rendered PNGs into LLaVA records; the runner
(:mod:`cambrian_core.data.runner`) drives both, append-only and resumable.
"""

from __future__ import annotations

from cambrian_core.data.case import Case, ImageRef, Reject
from cambrian_core.data.converter import Converter, LayoutError

__all__ = ["Case", "Converter", "ImageRef", "LayoutError", "Reject"]
