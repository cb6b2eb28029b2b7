"""The wheel carries everything a non-editable install needs: both import packages, prompts and the configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_packages_prompts_and_configs(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path),
        str(REPO),
    ]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("cambrian-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        REPO / "configs" / n.removeprefix("cambrian_configs/")
        for n in names
        if n.startswith("cambrian_configs/")
    }
    assert configs == {p for p in (REPO / "configs").rglob("*") if p.suffix in (".py", ".json")}
    for member in (
        "cambrian_core/registry.py",
        "cambrian_plugins/encoders/__init__.py",
        "cambrian_plugins/connectors/sva.py",
        "cambrian_core/data/prompts/generic.v1.txt",
        "cambrian_core/py.typed",
    ):
        assert member in names, member
    # every module of the checkout is in the wheel (a folder without __init__.py is silently left out)
    sources = {
        f"cambrian_core/{p.relative_to(REPO / 'cambrian_core')}"
        for p in (REPO / "cambrian_core").rglob("*.py")
    }
    sources |= {
        f"cambrian_plugins/{p.relative_to(REPO / 'plugins')}" for p in (REPO / "plugins").rglob("*.py")
    }
    assert sources - names == set()
    assert not any(n.startswith("plugins/") for n in names), "built-ins must install as cambrian_plugins"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[cambrian.plugins]" in text and "core = cambrian_core.builtin" in text
