"""Images that arrive with a request: base64 / data URLs / local files -> checked PIL RGB images.

PNG, JPEG and the other raster formats Pillow reads are decoded in memory; DICOM and NIfTI (sniffed from their
bytes, not from a name) go through :func:`cambrian_core.data.medimage.load_image` with the request's window and
slice options. Every refusal is a :class:`~cambrian_core.serve.errors.RequestError` naming the image and the limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import tempfile
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cambrian_core.serve.errors import RequestError

__all__ = [
    "ImageLimits",
    "ScanOptions",
    "decode_base64",
    "image_from_bytes",
    "image_from_file",
    "image_from_url",
    "sniff_kind",
    "to_base64_png",
]

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I
)
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
#: raster formats a request may carry: decoded by Pillow itself. Formats Pillow hands to outside programs (EPS /
#: PostScript to Ghostscript) or rarely seen ones are refused, since uploads are untrusted.
RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "JPEG2000", "PPM")
#: request options that apply to each kind of file
_KIND_OPTIONS = {
    "dicom": {"window", "frame", "slice_index"},
    "nifti": {"window", "slice_axis", "slice_index"},
    "raster": {"window", "frame"},
}


@dataclass(frozen=True)
class ImageLimits:
    """What one request may carry: image count, encoded bytes per image, pixels per decoded 2-D image, and voxels
    per DICOM / NIfTI scan (checked from its header before any pixel data is decoded: a small gzipped volume can
    inflate to gigabytes)."""

    max_images: int = 8
    max_bytes: int = 32 * 2**20
    max_pixels: int = 50_000_000
    max_voxels: int = 512 * 512 * 512

    def check_count(self, n: int) -> None:
        """Refuse more than ``max_images`` images (HTTP 400)."""
        if n > self.max_images:
            raise RequestError(
                f"too many images: {n} were sent but at most {self.max_images} are accepted per request "
                "(server option --max-images)",
                param="images",
                code="too_many_images",
            )


@dataclass(frozen=True)
class ScanOptions:
    """How DICOM / NIfTI pixels become an 8-bit image (see ``medimage.load_image``)."""

    window: Any = None
    slice_axis: int | None = None
    slice_index: int | None = None
    frame: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        out = {
            k: v
            for k, v in (
                ("window", self.window),
                ("slice_axis", self.slice_axis),
                ("slice_index", self.slice_index),
                ("frame", self.frame),
            )
            if v is not None
        }
        return {**out, **self.extra}


_PILLOW_LIMIT = threading.Lock()


def sniff_kind(data: bytes) -> str | None:
    """``"dicom"``, ``"nifti"`` (plain or gzipped), ``"raster"`` (one of :data:`RASTER_FORMATS`) or ``None``."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    head = data[:544]
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:65536], 544)
        except zlib.error:
            return None
    if len(head) >= 348:
        size_le, size_be = int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")
        if 348 in (size_le, size_be) and head[344:348] in (b"n+1\0", b"ni1\0"):
            return "nifti"
        if 540 in (size_le, size_be) and head[4:8] in (b"n+2\0", b"ni2\0"):
            return "nifti"
    if data[:2] == b"\x1f\x8b":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _open_raster(data)
    except Exception:
        return "dicom" if _headerless_dicom(data) else None
    return "raster"


def _open_raster(data: bytes) -> Image.Image:
    """``Image.open`` (header only) without Pillow's global ~89.5 MP bomb limit: the caller's
    ``ImageLimits.max_pixels`` replaces it."""
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _headerless_dicom(data: bytes) -> bool:
    """Whether ``data`` is DICOM written without the 128-byte preamble (the test ``medimage`` applies)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    except Exception:
        return False
    return "SOPClassUID" in ds and "Rows" in ds


def decode_base64(text: str, what: str = "image") -> bytes:
    """Strict base64 (standard or URL-safe alphabet, padding optional, whitespace ignored) -> bytes."""
    cleaned = re.sub(r"\s+", "", text)
    if "-" in cleaned or "_" in cleaned:
        cleaned = cleaned.replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            f"{what} is not valid base64 ({exc}); send the file's bytes base64-encoded, optionally as a data URL "
            "`data:image/png;base64,...`",
            code="invalid_base64",
        ) from None


def _check_bytes(data: bytes, what: str, limits: ImageLimits) -> None:
    if len(data) > limits.max_bytes:
        raise RequestError(
            f"{what} is {len(data) / 2**20:.1f} MiB; the limit is {limits.max_bytes / 2**20:.1f} MiB per image "
            "(server option --max-image-mb)",
            status=413,
            code="image_too_large",
        )
    if not data:
        raise RequestError(f"{what} is empty", code="invalid_image")


def _check_pixels(w: int, h: int, what: str, limits: ImageLimits) -> None:
    if w * h > limits.max_pixels:
        raise RequestError(
            f"{what} is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is {limits.max_pixels / 1e6:.1f} "
            "megapixels per image",
            status=413,
            code="image_too_large",
        )


#: name prefix of the temporary copy a scan upload is decoded from
_UPLOAD_PREFIX = "cambrian-upload-"


def _without(message: str, path: str) -> str:
    """``message`` without the name of the temporary copy of an upload (the caller names the image itself)."""
    if Path(path).name.startswith(_UPLOAD_PREFIX):
        return message.replace(f"{path}: ", "").replace(path, "the file")
    return message


def _scan_shape(path: str, kind: str) -> tuple[int, ...] | None:
    """The voxel grid a DICOM / NIfTI header declares (``None`` when the header cannot be read: the loader then
    reports the file as unreadable)."""
    try:
        if kind == "nifti":
            import nibabel as nib

            return tuple(int(n) for n in nib.load(path).header.get_data_shape())
        if kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            return (frames, int(ds.Rows), int(ds.Columns), int(getattr(ds, "SamplesPerPixel", 1) or 1))
    except Exception:
        return None
    return None


def _load_scan(path: str, kind: str, what: str, options: ScanOptions, limits: ImageLimits) -> Image.Image:
    from cambrian_core.data import medimage

    shape = _scan_shape(path, kind)
    if shape is not None and math.prod(shape) > limits.max_voxels:
        raise RequestError(
            f"{what} is a {kind} scan of {'x'.join(map(str, shape))} = {math.prod(shape):,} voxels; the limit is "
            f"{limits.max_voxels:,} voxels per scan",
            status=413,
            code="image_too_large",
        )
    accepted = _KIND_OPTIONS.get(kind, set())
    kwargs = {k: v for k, v in options.kwargs().items() if k in accepted}  # a request's options fit its scans
    try:
        img = medimage.load_image(path, kind=kind, **kwargs)
    except medimage.ImageLoadError as exc:
        reason = _without(str(exc), path)
        raise RequestError(f"{what} could not be read as {kind}: {reason}", code="invalid_image") from None
    except (TypeError, ValueError) as exc:  # bad window / slice options
        raise RequestError(f"{what}: {_without(str(exc), path)}", code="invalid_image_options") from None
    _check_pixels(*img.size, what, limits)
    return img.convert("RGB")


def image_from_bytes(
    data: bytes, what: str = "image", limits: ImageLimits | None = None, options: ScanOptions | None = None
) -> Image.Image:
    """Decode one image's bytes (PNG / JPEG / ... / DICOM / NIfTI) into a checked RGB image."""
    limits = limits or ImageLimits()
    options = options or ScanOptions()
    _check_bytes(data, what, limits)
    kind = sniff_kind(data)
    if kind is None:
        raise RequestError(
            f"{what} ({len(data)} bytes) is not an image: expected PNG, JPEG, TIFF, BMP, GIF, WebP, JPEG 2000, "
            "DICOM or NIfTI data",
            code="invalid_image",
        )
    if kind == "raster":
        try:
            img = _open_raster(data)
            _check_pixels(*img.size, what, limits)
            img.load()
        except RequestError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise RequestError(
                f"{what} decompresses to too many pixels", status=413, code="image_too_large"
            ) from None
        except Exception as exc:
            raise RequestError(f"{what} could not be decoded: {exc}", code="invalid_image") from None
        if img.mode not in _HIGH_DEPTH_MODES:
            return img.convert("RGB")
        # 16-bit / float rasters: medimage rescales them (full range or the requested window)
    suffix = {"dicom": ".dcm", "nifti": ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"}.get(kind, ".bin")
    fd, path = tempfile.mkstemp(suffix=suffix, prefix=_UPLOAD_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return _load_scan(path, kind, what, options, limits)
    finally:
        os.unlink(path)


def image_from_file(
    path: str | os.PathLike[str],
    what: str | None = None,
    limits: ImageLimits | None = None,
    options: ScanOptions | None = None,
) -> Image.Image:
    """A local file (PNG / JPEG / DICOM / NIfTI / DICOM-series folder) -> checked RGB image."""
    p = Path(path).expanduser()
    what = what or f"image {str(p)!r}"
    if not p.exists():
        raise RequestError(f"{what} does not exist", param="image", code="image_not_found")
    if p.is_dir():
        return _load_scan(str(p), "dicom", what, options or ScanOptions(), limits or ImageLimits())
    return image_from_bytes(p.read_bytes(), what, limits, options)


def image_from_url(
    url: str,
    what: str = "image",
    limits: ImageLimits | None = None,
    options: ScanOptions | None = None,
    allow_local_files: bool = False,
) -> Image.Image:
    """An OpenAI ``image_url``: a data URL, bare base64, or (when allowed) a local path / ``file://`` URL."""
    m = _DATA_URL.match(url)
    if m:
        if not m.group("b64"):
            raise RequestError(
                f"{what}: only base64 data URLs are accepted (`data:<mime>;base64,...`)", code="invalid_image"
            )
        return image_from_bytes(decode_base64(url[m.end() :], what), what, limits, options)
    scheme = url.split(":", 1)[0].lower() if re.match(r"^[a-zA-Z][\w+.-]*://", url) else ""
    if scheme in ("http", "https"):
        raise RequestError(
            f"{what}: remote URLs are not fetched by this server; send the image as a data URL "
            "(`data:image/png;base64,...`)",
            code="remote_url_refused",
        )
    path_like = len(url) <= 1024 and (
        url.startswith(("/", "~", "./", "../")) or re.match(r"^[A-Za-z]:[\\/]", url)
    )
    if path_like and scheme != "file":  # a JPEG's base64 starts with "/9j/": try that reading first
        try:
            data = decode_base64(url, what)
            if sniff_kind(data):
                return image_from_bytes(data, what, limits, options)
        except RequestError:
            pass
    if scheme == "file" or path_like:
        if not allow_local_files:
            raise RequestError(
                f"{what}: local file paths are disabled; start the server with --allow-local-files or send a "
                "data URL",
                status=403,
                code="local_files_disabled",
            )
        return image_from_file(url[7:] if scheme == "file" else url, what, limits, options)
    if scheme:
        raise RequestError(
            f"{what}: unsupported URL scheme `{scheme}`; send a data URL", code="invalid_image"
        )
    return image_from_bytes(decode_base64(url, what), what, limits, options)


def to_base64_png(image: Image.Image) -> str:
    """PNG bytes of ``image``, base64-encoded (what the web server sends to workers)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
