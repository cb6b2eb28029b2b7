"""The example third-party plugin: install -> components appear and build from config -> uninstall -> gone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugin-example"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

BUILD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from PIL import Image
    from cambrian_core import DATASETS, ENCODERS, build
    from cambrian_core.config import load_config

    cfg_path, folder = sys.argv[1], sys.argv[2]
    cfg = load_config(cfg_path, validate=False)
    enc = build(ENCODERS, cfg._tower)
    x = enc.preprocess(Image.new("RGB", (40, 64), (200, 10, 10)))[None]
    conv = build(DATASETS, dict(type="captioned_folder", src=folder))
    conv.check_layout()
    cases = list(conv.iter_cases())
    print(json.dumps({
        "shape": list(enc(x).shape),
        "provider": ENCODERS.providers["patch_conv"],
        "cases": [getattr(c, "case_id") for c in cases],
        "kinds": [type(c).__name__ for c in cases],
    }))
    """
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cambrian_core.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_install_build_uninstall(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (0, 128, 0)).save(folder / "a.png")
    (folder / "a.txt").write_text("A green square.")
    Image.new("RGB", (32, 32), (0, 0, 128)).save(folder / "b.png")  # no caption -> Reject
    user_cfg = tmp_path / "user.py"
    user_cfg.write_text("_base_ = ['example::patch_conv_tower.py']\n")
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT)

    assert "patch_conv" not in _cli("plugins", "list", "--kind", "encoders").stdout
    subprocess.run(
        [*PIP, "install", "--no-deps", "--no-build-isolation", str(EXAMPLE)], check=True, timeout=300
    )
    try:
        listed = _cli("plugins", "list", "--json")
        table = json.loads(listed.stdout)["components"]
        enc = {r["name"]: r["provider"] for r in table["encoders"]}
        ds = {r["name"]: r["provider"] for r in table["datasets"]}
        assert enc["patch_conv"] == "cambrian-plugin-example 0.2.0"
        assert ds["captioned_folder"] == "cambrian-plugin-example 0.2.0"

        out = subprocess.run(
            [sys.executable, str(script), str(user_cfg), str(folder)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["shape"] == [1, 64, 48]  # 64 px / patch 8 -> 8x8 tokens of width 48
        assert got["provider"] == "cambrian-plugin-example 0.2.0"
        assert got["cases"] == ["a", "b"] and got["kinds"] == ["Case", "Reject"]
    finally:
        subprocess.run([*PIP, "uninstall", "-y", "cambrian-plugin-example"], check=True, timeout=300)

    after = _cli("plugins", "list", "--kind", "encoders")
    assert after.returncode == 0 and "patch_conv" not in after.stdout
    gone = _cli("config", "show", str(user_cfg), "--no-check")
    assert gone.returncode == 2 and "unknown config scope `example`" in gone.stderr
