"""The unit a converter yields: a :class:`Case` (images + structured labels + free text) or a :class:`Reject`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Case", "ImageRef", "Reject"]


@dataclass
class ImageRef:
    """One image of a case, loaded lazily by :func:`cambrian_core.data.medimage.load_image`.

    ``path`` is a file (DICOM, NIfTI, PNG incl. 16-bit, TIFF, JPEG) or a folder (DICOM series). ``kind`` is
    ``"dicom"``, ``"nifti"``, ``"png16_hu"`` (DeepLesion), ``"png16"`` (PadChest full-range) or ``None`` (guess).
    ``options`` are passed to ``load_image``: ``window=(center, width)`` or a preset name, ``slice_axis``,
    ``slice_index``, ``frame``, ``phase``, ... ``view`` names the view in multi-view samples ("PA", "arterial").
    """

    path: str
    kind: str | None = None
    options: dict = field(default_factory=dict)
    view: str | None = None


@dataclass
class Case:
    """One unit of a source (a figure, a study, a lesion, a case report)."""

    source: str  # converter name, e.g. "padchest"
    case_id: str  # stable id within the source (resume / dedup / provenance)
    images: list[ImageRef]
    labels: dict[str, Any] = field(
        default_factory=dict
    )  # modality, body_part, findings, lesion_type, phase, ...
    text: dict[str, str] = field(
        default_factory=dict
    )  # caption, report, history, findings, diagnosis, title, ...
    #: cases that share their images by design (Quilt: the rows of one video frame, each with its own text); the
    #: records of one group are never duplicates of each other in ``cambrian data filter``
    group: str | None = None


@dataclass
class Reject:
    """A unit that could not be turned into a :class:`Case`; ``reason`` names the file/column/field and problem."""

    source: str
    case_id: str
    reason: str
