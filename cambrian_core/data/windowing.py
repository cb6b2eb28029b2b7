"""Intensity windowing: map CT Hounsfield units, MR signal or raw detector values to 8-bit grey levels.

A window is ``(center, width)``: ``center - width/2`` maps to 0 and ``center + width/2`` to 255, linearly, with
values outside clipped. Named presets are the usual radiology display windows (Hounsfield units).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["PRESETS", "minmax_to_uint8", "percentile_to_uint8", "resolve_window", "window_to_uint8"]

#: preset name -> (center, width) in Hounsfield units
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
}

#: window keywords that are not (center, width) pairs
MODES = ("auto", "tags", "minmax", "percentile")


def resolve_window(window: object) -> tuple[float, float] | str:
    """Normalise a window option: a preset name or ``(center, width)`` -> pair; a mode keyword -> itself.

    Raises:
        ValueError: unknown preset / keyword, a width that is not positive, or a value that is not finite.
    """
    if window is None:
        return "auto"
    if isinstance(window, str):
        key = window.strip().lower()
        if key in PRESETS:
            return PRESETS[key]
        if key in MODES:
            return key
        if "," in key:  # "40,400" from the command line
            return resolve_window(tuple(float(v) for v in key.split(",")))
        raise ValueError(
            f"unknown window {window!r}: use a preset ({', '.join(PRESETS)}), one of {', '.join(MODES)}, "
            "or (center, width)"
        )
    if isinstance(window, Sequence) and len(window) == 2:
        center, width = (float(v) for v in window)
        if not (math.isfinite(center) and math.isfinite(width)):
            raise ValueError(f"a window's center and width must be finite numbers, got ({center}, {width})")
        if width <= 0:
            raise ValueError(f"window width must be > 0, got {width}")
        return center, width
    raise ValueError(f"a window must be a preset name or (center, width), got {window!r}")


def window_to_uint8(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window: ``center - width/2`` -> 0, ``center + width/2`` -> 255, clipped, rounded."""
    low = center - width / 2.0
    scaled = (np.asarray(arr, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Full-range rescale: the data minimum -> 0, maximum -> 255 (a constant image -> all 0)."""
    a = np.asarray(arr, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return window_to_uint8(a, (lo + hi) / 2.0, hi - lo)


def percentile_to_uint8(
    arr: np.ndarray, reference: np.ndarray | None = None, low: float = 0.5, high: float = 99.5
) -> np.ndarray:
    """Robust rescale between two percentiles of ``reference`` (default: ``arr`` itself, e.g. the whole volume)."""
    ref = np.asarray(arr if reference is None else reference)
    lo, hi = (float(v) for v in np.percentile(ref, [low, high]))
    if hi <= lo:
        return minmax_to_uint8(arr)
    return window_to_uint8(arr, (lo + hi) / 2.0, hi - lo)
