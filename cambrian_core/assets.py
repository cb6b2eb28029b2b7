"""Real medical files that PyPI packages ship, located (never committed) for the demo and the tests.

* installed packages: pydicom-data DICOM scans (through pydicom's own data registry), scikit-image images;
* a wheel used only as a data file: torchxrayvision ships the IU chest X-ray reports and the PadChest CSV.
  The wheel is downloaded once with pip (no import, no dependencies) into the cache and read as a zip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["AssetError", "cache_dir", "dicom_file", "wheel_member", "xrv_wheel"]

XRV_VERSION = "1.5.7"


class AssetError(RuntimeError):
    """A packaged asset is not available; the message says which package provides it and how to get it."""


def cache_dir(*parts: str) -> Path:
    """``$CAMBRIAN_CACHE`` (default ``~/.cache/cambrian``) joined with ``parts``, created."""
    root = Path(os.environ.get("CAMBRIAN_CACHE") or Path.home() / ".cache" / "cambrian").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def dicom_file(name: str) -> Path:
    """Path of a DICOM file shipped by pydicom or pydicom-data (e.g. ``"RG1_UNCR.dcm"``, a real PA chest CR)."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except TypeError:  # older pydicom without the keyword
        path = get_testdata_file(name)
    if path is None or not Path(path).is_file():
        raise AssetError(f"DICOM test file {name} not found; `pip install pydicom-data` ships it")
    return Path(path)


def xrv_wheel(version: str = XRV_VERSION) -> Path:
    """The torchxrayvision wheel, downloaded once (``pip download --no-deps``) into the cache."""
    folder = cache_dir("assets")
    existing = sorted(folder.glob(f"torchxrayvision-{version}-*.whl"))
    if existing:
        return existing[0]
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            tmp,
            f"torchxrayvision=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise AssetError(
                f"could not download torchxrayvision=={version} (it ships the IU reports and the PadChest CSV): "
                f"{proc.stderr.strip()[-400:]}"
            )
        target = folder / wheels[0].name
        os.replace(wheels[0], target)
    return target


def wheel_member(wheel: Path, member_suffix: str) -> bytes:
    """Bytes of the one member of ``wheel`` whose path ends with ``member_suffix``."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if len(names) != 1:
            raise AssetError(f"{wheel.name} has {len(names)} members ending with {member_suffix!r}")
        return zf.read(names[0])
