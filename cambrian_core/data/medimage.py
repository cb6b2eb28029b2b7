"""Medical image I/O: DICOM, NIfTI, 16-bit PNG, TIFF, JPEG and PNG -> one 8-bit RGB ``PIL.Image``.

``load_image`` is the one entry point; everything a model sees is written with ``to_png_bytes`` (PNG, declared
``image/png``). Pixel decoding, modality/VOI LUTs and reorientation are done by pydicom and nibabel; this module
only chooses the frame / slice / window and turns the result into grey levels.

Options (all keyword arguments, or ``ImageRef.options``):

* ``window``: ``"auto"`` (default: DICOM VOI tags if present, else the 0.5-99.5 percentiles of the image or
  whole volume; full range for plain 16-bit PNG), ``"tags"``, ``"minmax"``, ``"percentile"``, a preset name
  (:data:`~cambrian_core.data.windowing.PRESETS`) or ``(center, width)`` in modality units (HU for CT).
* ``invert``: invert grey levels (MONOCHROME1 DICOM is inverted automatically).
* ``frame``: frame of a multi-frame DICOM or multi-page TIFF (``int`` or ``"middle"``, the default).
* ``slice_axis`` (``"axial"``, ``"coronal"``, ``"sagittal"``), ``slice_index`` (``int`` or ``"middle"``),
  ``voxel`` (``(i, j, k)`` voxel of the file whose slice is wanted, e.g. a lesion centre), ``mask`` (a NIfTI mask
  path: slice through its centroid), ``phase`` (volume of a 4-D NIfTI): NIfTI and DICOM series folders.
* ``max_size``: shrink so the longest side is at most this many pixels.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cambrian_core.data.case import ImageRef
from cambrian_core.data.windowing import (
    minmax_to_uint8,
    percentile_to_uint8,
    resolve_window,
    window_to_uint8,
)

__all__ = [
    "KINDS",
    "ImageLoadError",
    "dicom_header",
    "guess_kind",
    "load_image",
    "mime_type",
    "to_png_bytes",
    "to_rgb",
]

log = logging.getLogger(__name__)

#: image kinds ``load_image`` understands (``None`` = guess from the file)
KINDS = ("dicom", "nifti", "png16_hu", "png16", "raster")

_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
_COMMON = {"window", "invert", "max_size"}
_ALLOWED = {
    "dicom": _COMMON | {"frame", "slice_index", "voi_index"},
    "nifti": _COMMON | {"slice_axis", "slice_index", "voxel", "mask", "phase"},
    "png16_hu": _COMMON,
    "png16": _COMMON,
    "raster": _COMMON | {"frame"},
}
#: HU = stored value - 32768 in DeepLesion's 16-bit PNGs
DEEPLESION_OFFSET = 32768
#: at most this many voxels are used to estimate per-volume percentiles
_PERCENTILE_SAMPLE = 2_000_000


class ImageLoadError(ValueError):
    """A file could not be turned into an image; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# ----------------------------------------------------------------------------------------------- public API


def load_image(
    path_or_ref: str | os.PathLike | ImageRef, kind: str | None = None, **options: Any
) -> Image.Image:
    """Load one medical image as an 8-bit RGB ``PIL.Image`` (see the module docstring for the options).

    An :class:`ImageRef` contributes its ``path``, ``kind`` and ``options``; keyword ``options`` override them.

    Raises:
        ImageLoadError: missing, corrupt, truncated or unsupported file (message names the file and problem).
        ValueError: an unknown option or kind.
    """
    if isinstance(path_or_ref, ImageRef):
        options = {**path_or_ref.options, **options}
        kind = kind or path_or_ref.kind
        path_or_ref = path_or_ref.path
    path = Path(path_or_ref)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    kind = kind or guess_kind(path)
    if kind not in _ALLOWED:
        raise ValueError(f"unknown image kind {kind!r} for {path}; known kinds: {', '.join(KINDS)}")
    unknown = set(options) - _ALLOWED[kind]
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for a {kind} image ({path}); accepted: {sorted(_ALLOWED[kind])}"
        )
    opts = dict(options)
    max_size = opts.pop("max_size", None)
    if kind == "dicom":
        img = _load_dicom_series(path, opts) if path.is_dir() else _load_dicom(path, opts)
    elif kind == "nifti":
        img = _load_nifti(path, opts)
    else:
        img = _load_raster(path, kind, opts)
    if max_size and max(img.size) > int(max_size):
        img.thumbnail((int(max_size), int(max_size)), Image.Resampling.LANCZOS)
    return img if img.mode == "RGB" else img.convert("RGB")


def guess_kind(path: str | os.PathLike) -> str:
    """``"dicom"``, ``"nifti"`` or ``"raster"`` (PNG/TIFF/JPEG/...; 16-bit rasters get a full-range rescale)."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith((".nii", ".nii.gz", ".img", ".hdr")):
        return "nifti"
    if name.endswith((".dcm", ".dicom", ".ima")):
        return "dicom"
    with open(p, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    return "raster"


def to_png_bytes(img: Image.Image, compress_level: int = 6) -> bytes:
    """Encode ``img`` as PNG (the format every image sent to a model is written in)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


_MAGIC: list[tuple[int, bytes, str]] = [
    (128, b"DICM", "application/dicom"),  # first: a DICOM preamble may itself hold a TIFF header
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"BM", "image/bmp"),
    (0, b"\x1f\x8b", "application/gzip"),
]


def mime_type(path_or_bytes: str | os.PathLike | bytes) -> str:
    """The real MIME type from the content's magic bytes (never from a claimed extension alone).

    Unknown content gives the extension's type when there is one, else ``application/octet-stream``.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        head, name = bytes(path_or_bytes[:512]), None
    else:
        name = str(path_or_bytes)
        with open(name, "rb") as f:
            head = f.read(512)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for offset, magic, mime in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return mime
    if name:
        guessed, _ = mimetypes.guess_type(name)
        if guessed:
            return guessed
    return "application/octet-stream"


def dicom_header(path: str | os.PathLike) -> dict[str, str]:
    """Descriptive header fields of a DICOM file (no pixel decoding); absent fields are left out.

    Raises:
        ImageLoadError: the file is not DICOM.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises InvalidDicomError, OSError, EOFError, ...
        raise ImageLoadError(path, f"not a readable DICOM file ({exc})") from exc
    keys = (
        "Modality",
        "BodyPartExamined",
        "StudyDescription",
        "SeriesDescription",
        "ViewPosition",
        "PatientSex",
        "PatientAge",
        "Manufacturer",
    )
    out = {}
    for key in keys:
        value = ds.get(key)
        if value not in (None, ""):
            out[key] = str(value).strip()
    return {k: v for k, v in out.items() if v}


# ----------------------------------------------------------------------------------------------- helpers


def _index(value: Any, n: int, what: str, path: Path) -> int:
    """Resolve an index option (``int`` or ``"middle"``) against ``n`` items."""
    if value is None or value == "middle":
        return n // 2
    try:
        idx = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer or 'middle', got {value!r} ({path})") from None
    if not -n <= idx < n:
        raise ImageLoadError(path, f"{what} {idx} out of range: the image has {n}")
    return idx % n


#: Pillow modes of more than 8 bits per sample (16-bit PNG / TIFF, 32-bit integer or float)
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB: 16-bit and float greyscale rescaled over its own range (Pillow's
    ``convert("RGB")`` clips them at 255, turning a 12-bit radiograph white), everything else converted."""
    if im.mode in HIGH_DEPTH_MODES:
        return _gray_to_image(_apply_window(np.asarray(im), None, None, "minmax"), False).convert("RGB")
    return im.convert("RGB")


def _gray_to_image(gray: np.ndarray, invert: bool) -> Image.Image:
    if invert:
        gray = 255 - gray
    return Image.fromarray(np.ascontiguousarray(gray), mode="L")


def _scale_to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    """Colour data of ``bits`` bits per sample -> 8 bits."""
    if arr.dtype == np.uint8 or bits <= 8:
        return arr.astype(np.uint8)
    return (arr.astype(np.float32) * (255.0 / (2**bits - 1))).round().clip(0, 255).astype(np.uint8)


def _sample(values: np.ndarray) -> np.ndarray:
    """Every k-th value so that percentiles of a large volume stay cheap."""
    flat = values.reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLE)
    return flat[::step]


def _apply_window(values: np.ndarray, window: Any, reference: np.ndarray | None, default: str) -> np.ndarray:
    """Grey levels for ``values`` under a resolved window (no DICOM tags involved)."""
    mode = resolve_window(window)
    if mode == "auto":
        mode = default
    if mode == "tags":
        raise ValueError("window='tags' needs a DICOM file with Window Center/Width or a VOI LUT")
    if mode == "minmax":
        ref = values if reference is None else reference
        lo, hi = float(np.min(ref)), float(np.max(ref))
        return window_to_uint8(values, (lo + hi) / 2, hi - lo) if hi > lo else minmax_to_uint8(values)
    if mode == "percentile":
        return percentile_to_uint8(values, None if reference is None else _sample(reference))
    center, width = mode
    return window_to_uint8(values, center, width)


# ----------------------------------------------------------------------------------------------- DICOM

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"}
_VIEW_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "BitsAllocated",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)


def _read_dicom(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        try:  # DICOM written without the 128-byte preamble
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:
            raise ImageLoadError(path, f"not a DICOM file ({exc})") from exc
        if "SOPClassUID" not in ds and "PixelData" not in ds:
            raise ImageLoadError(path, "not a DICOM file (no DICM preamble, no SOP Class UID)") from None
        return ds
    except Exception as exc:  # truncated header, bad VR, ...
        raise ImageLoadError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc


def _frame_view(ds: Any, frame: int) -> Any:
    """A flat dataset with the LUT attributes of ``frame``: top level, then shared, then per-frame groups."""
    from pydicom.dataset import Dataset

    view = Dataset()
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    for kw in _VIEW_KEYWORDS:
        if kw in ds:
            view[ds[kw].tag] = ds[kw]
    groups = []
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    for group in groups:
        for seq in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            items = group.get(seq)
            if items:
                for elem in items[0]:
                    view[elem.tag] = elem
    return view


_NO_VOI = "the header has no Window Center/Width or VOI LUT"


def _voi_problem(view: Any, index: int) -> str | None:
    """Why the VOI tags of ``view`` cannot window it at ``voi_index`` (``None``: they can). PS3.3 C.11.2.1.2:
    a linear window needs a width >= 1; empty values or an index beyond the listed windows are unusable."""
    if view.get("VOILUTSequence"):
        n = len(view.VOILUTSequence)
        return None if 0 <= index < n else f"voi_index {index} is outside the {n} VOI LUT(s) of the header"
    if "WindowCenter" not in view or "WindowWidth" not in view:
        return _NO_VOI
    centres, widths = view["WindowCenter"], view["WindowWidth"]
    if centres.VM == 0 or widths.VM == 0 or centres.value is None or widths.value is None:
        return "Window Center/Width (0028,1050/1051) are present but empty"
    n = min(centres.VM, widths.VM)
    if not 0 <= index < n:
        return f"voi_index {index} is outside the {n} window(s) of the header"
    width = widths.value[index] if widths.VM > 1 else widths.value
    try:
        if float(width) < 1:
            return f"Window Width (0028,1051) {width} is below 1"
    except (TypeError, ValueError):
        return f"Window Width (0028,1051) {width!r} is not a number"
    return None


def _voi_range(view: Any, index: int) -> tuple[float, float]:
    """Output range of pydicom's VOI transform for ``view`` (probed through pydicom itself)."""
    from pydicom.pixels import apply_voi_lut

    if view.get("VOILUTSequence"):
        desc = view.VOILUTSequence[index].LUTDescriptor
        n = desc[0] or 2**16
        out = apply_voi_lut(np.arange(desc[1], desc[1] + n), view, index=index)
    else:
        width = float(view.WindowWidth[index] if view["WindowWidth"].VM > 1 else view.WindowWidth)
        with np.errstate(over="ignore"):
            out = apply_voi_lut(np.array([-1e9, 1e9]) * max(width, 1.0), view, index=index)
    return float(np.min(out)), float(np.max(out))


def _load_dicom(path: Path, opts: dict) -> Image.Image:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    ds = _read_dicom(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        raise ImageLoadError(path, f"no pixel data (Modality {ds.get('Modality', '?')}, {sop}): not an image")
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise ImageLoadError(
            path, f"invalid Number of Frames (0028,0008) {ds.get('NumberOfFrames')!r}"
        ) from None
    frame = _index(opts.get("frame"), n_frames, "frame", path)
    try:
        arr = pixel_array(ds, index=frame if n_frames > 1 else None)
    except Exception as exc:  # missing decoder plugin, truncated or corrupt pixel data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts))
        compressed = bool(getattr(ts, "is_compressed", False))
        hint = (
            " (compressed syntaxes need pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"
            if compressed
            else ""
        )
        raise ImageLoadError(
            path, f"pixel data cannot be decoded, transfer syntax {ts_name}: {exc}{hint}"
        ) from exc
    if arr.ndim == 3 and n_frames > 1 and arr.shape[0] == n_frames:  # decoder ignored index
        arr = arr[frame]
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return Image.fromarray(_scale_to_uint8(rgb, depth), mode="RGB")
    if pi in _COLOUR:
        return Image.fromarray(_scale_to_uint8(arr, bits), mode="RGB")
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageLoadError(path, f"unsupported Photometric Interpretation {pi!r}")
    view = _frame_view(ds, frame)
    values = apply_modality_lut(arr, view)
    window = resolve_window(opts.get("window"))
    index = int(opts.get("voi_index", 0))
    voi_problem = _voi_problem(view, index)
    has_voi = voi_problem is None
    if voi_problem is not None and voi_problem.startswith("voi_index"):
        raise ImageLoadError(path, voi_problem)
    if window == "tags" and voi_problem is not None:
        raise ImageLoadError(path, f"window='tags' but {voi_problem}")
    if window == "auto" and voi_problem is not None and voi_problem != _NO_VOI:
        log.debug("%s: %s; windowed by percentiles instead", path, voi_problem)
    if window in ("auto", "tags") and has_voi:
        lo, hi = _voi_range(view, index)
        out = apply_voi_lut(values, view, index=index)
        gray = window_to_uint8(out, (lo + hi) / 2, hi - lo) if hi > lo else minmax_to_uint8(out)
    else:
        gray = _apply_window(values, window, None, "percentile")
    return _gray_to_image(gray, (pi == "MONOCHROME1") != bool(opts.get("invert", False)))


def _load_dicom_series(folder: Path, opts: dict) -> Image.Image:
    """One slice of a DICOM series folder, ordered along the slice normal (or by Instance Number)."""
    import pydicom

    slices = []
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM (DICOMDIR readme, thumbnails ...)
            continue
        if "Rows" not in ds:
            continue
        pos, orient = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if pos is not None and orient is not None:
            normal = np.cross(np.array(orient[:3], float), np.array(orient[3:], float))
            key = float(np.dot(normal, np.array(pos, float)))
        else:
            key = float(ds.get("InstanceNumber") or 0)
        slices.append((key, str(f)))
    if not slices:
        raise ImageLoadError(folder, "folder holds no DICOM image files")
    slices.sort()
    idx = _index(opts.get("slice_index"), len(slices), "slice_index", folder)
    frame_opts = {k: v for k, v in opts.items() if k != "slice_index"}
    return _load_dicom(Path(slices[idx][1]), frame_opts)


# ----------------------------------------------------------------------------------------------- NIfTI


def _nifti_slice_index(img: Any, canon: Any, vol_shape: tuple, axis: int, opts: dict, path: Path) -> int:
    """The slice of canonical ``axis``: explicit index, through a file voxel, through a mask centroid, or middle."""
    import nibabel as nib

    to_canon = np.linalg.inv(canon.affine)
    if opts.get("mask") is not None:
        mask_path = Path(opts["mask"])
        try:
            mask = nib.load(mask_path)
            m = np.asarray(mask.dataobj)
        except Exception as exc:
            raise ImageLoadError(mask_path, f"unreadable mask ({exc})") from exc
        nz = np.argwhere(m.reshape(m.shape[:3]) > 0) if m.ndim >= 3 else np.empty((0, 3))
        if len(nz) == 0:
            raise ImageLoadError(mask_path, "mask is empty: no lesion to centre on")
        centre = np.append(nz.mean(axis=0), 1.0)
        ijk = to_canon @ mask.affine @ centre
        return int(np.clip(np.rint(ijk[axis]), 0, vol_shape[axis] - 1))
    if opts.get("voxel") is not None:
        voxel = [float(v) for v in opts["voxel"]]
        if len(voxel) != 3:
            raise ValueError(f"voxel must be (i, j, k), got {opts['voxel']!r} ({path})")
        ijk = to_canon @ img.affine @ np.array([*voxel, 1.0])
        idx = int(np.rint(ijk[axis]))
        if not 0 <= idx < vol_shape[axis]:
            raise ImageLoadError(path, f"voxel {tuple(voxel)} lies outside the volume {vol_shape[:3]}")
        return idx
    return _index(opts.get("slice_index"), vol_shape[axis], "slice_index", path)


def _load_nifti(path: Path, opts: dict) -> Image.Image:
    import nibabel as nib

    try:
        img = nib.load(path)
        canon = nib.as_closest_canonical(img)
        data = canon.dataobj
        shape = tuple(canon.shape)
    except Exception as exc:  # ImageFileError, truncated gzip, bad header
        raise ImageLoadError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise ImageLoadError(path, f"expected a 3-D or 4-D volume, got shape {shape}")
    phase = opts.get("phase")
    try:
        if len(shape) == 4:
            phase = _index(0 if phase is None else phase, shape[3], "phase", path)
            vol = np.asarray(data[..., phase]).reshape(shape[:3])
        else:
            if phase not in (None, 0):
                raise ImageLoadError(path, f"phase {phase} asked of a 3-D volume")
            vol = np.asarray(data).reshape(shape[:3])
    except ImageLoadError:
        raise
    except Exception as exc:  # truncated data block
        raise ImageLoadError(path, f"volume data cannot be read ({type(exc).__name__}: {exc})") from exc
    vol = np.nan_to_num(vol.astype(np.float32, copy=False))
    axis_name = opts.get("slice_axis", "axial")
    if axis_name not in _AXES:
        raise ValueError(f"slice_axis must be one of {', '.join(_AXES)}, got {axis_name!r} ({path})")
    axis = _AXES[axis_name]
    idx = _nifti_slice_index(img, canon, vol.shape, axis, opts, path)
    sl = np.take(vol, idx, axis=axis)
    # canonical RAS+: show patient right on image left, anterior / superior at the top (radiological view)
    display = sl.T[::-1, ::-1]
    gray = _apply_window(display, opts.get("window"), vol, "percentile")
    return _gray_to_image(gray, bool(opts.get("invert", False)))


# ----------------------------------------------------------------------------------------------- rasters


def _load_raster(path: Path, kind: str, opts: dict) -> Image.Image:
    try:
        im = Image.open(path)
        n_frames = int(getattr(im, "n_frames", 1))
        if n_frames > 1:
            im.seek(_index(opts.get("frame"), n_frames, "frame", path))  # default: the middle page
        im.load()
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(path, f"unreadable or truncated image ({type(exc).__name__}: {exc})") from exc
    invert = bool(opts.get("invert", False))
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        if kind == "png16_hu":
            hu = arr.astype(np.float32) - DEEPLESION_OFFSET
            return _gray_to_image(_apply_window(hu, opts.get("window"), None, "percentile"), invert)
        return _gray_to_image(_apply_window(arr, opts.get("window"), None, "minmax"), invert)
    if kind == "png16_hu":  # DeepLesion key slices may already be 8-bit renderings: use them as they are
        log.debug("%s: %s image, not 16-bit HU; used as stored", path, im.mode)
        # the study's HU (centre, width), however given ("lung", "40,400", (40, 400)), means nothing for grey levels
        if isinstance(resolve_window(opts.get("window")), tuple):
            opts = {k: v for k, v in opts.items() if k != "window"}
    if im.mode in ("L", "1", "P", "LA") and (invert or opts.get("window") not in (None, "auto")):
        arr = np.asarray(im.convert("L"))
        window = opts.get("window")
        gray = arr if window in (None, "auto") else _apply_window(arr, window, None, "minmax")
        return _gray_to_image(gray, invert)
    if im.mode == "L":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        base = Image.new("RGB", rgba.size, (0, 0, 0))
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    return im.convert("RGB")
