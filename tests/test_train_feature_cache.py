"""Frozen-tower feature cache: built once, reused, stale and partial caches detected, same losses as live towers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from _train_fixtures import run, train_cfg, write_dataset
from PIL import Image

from cambrian_core.registry import ENCODERS, build
from cambrian_core.train.feature_cache import FeatureCache, StaleCacheError, content_hash


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n=16, text_only_every=0)


def tower() -> torch.nn.Module:
    torch.manual_seed(0)
    return build(ENCODERS, {"type": "clip", **ENCODERS.get("clip").tiny_config()}).eval()


def encode(t: torch.nn.Module, paths: list[Path]) -> torch.Tensor:
    return t(torch.stack([t.preprocess(Image.open(p).convert("RGB")) for p in paths]))


def test_build_reuse_stale_and_partial(records: Path, tmp_path: Path) -> None:
    images = {content_hash(p): p for p in sorted((records.parent / "images").glob("*.png"))}
    t = tower()
    cache = FeatureCache(tmp_path, t, shard_bytes=5 * t.token_len * t.hidden_size * 2)  # 5 images per shard
    assert cache.estimate_bytes(len(images)) == len(images) * t.token_len * t.hidden_size * 2
    status = cache.status(images)
    assert (status.cached, len(status.missing), status.stale) == (0, len(images), [])
    assert cache.build(images, lambda ps: encode(t, ps), batch_size=4) == len(images)
    shards = sorted(cache.folder.glob("shard_*.safetensors"))
    assert len(shards) == 4  # 16 images, 5 per shard
    h = next(iter(images))
    stored = cache.get(h)
    assert stored.dtype == torch.bfloat16 and stored.shape == (t.token_len, t.hidden_size)
    with torch.no_grad():
        live = encode(t, [images[h]])[0]
    torch.testing.assert_close(stored.float(), live, rtol=1e-2, atol=1e-2)

    again = FeatureCache(tmp_path, t)  # a later run: everything found, nothing to build
    assert again.status(images).complete and again.folder == cache.folder

    shards[1].unlink()  # a lost shard: its images are missing again, never read from elsewhere
    status = again.status(images)
    assert status.bad_shards == [shards[1].name] and len(status.missing) == 5
    assert again.build({k: images[k] for k in status.missing}, lambda ps: encode(t, ps)) == 5
    assert again.status(images).complete

    (cache.folder / "shard_00042.safetensors").write_bytes(
        b"half"
    )  # renamed by a build that died before listing it
    assert again.build({}, lambda ps: encode(t, ps)) == 0
    assert not (cache.folder / "shard_00042.safetensors").exists()

    with torch.no_grad():  # new tower weights: a different key, the old folder is stale and not used
        next(t.parameters()).add_(0.1)
    fresh = FeatureCache(tmp_path, t)
    assert fresh.folder != cache.folder
    status = fresh.status(images)
    assert status.stale == [cache.folder] and len(status.missing) == len(images)
    shutil.copytree(cache.folder, fresh.folder)  # someone copied features under the new key
    with pytest.raises(StaleCacheError, match=r"was built for tower weights .* delete the folder"):
        fresh.status(images)
    meta = json.loads((cache.folder / "meta.json").read_text())
    assert meta["complete"] and meta["cache_key"] == cache.key and meta["dtype"] == "bfloat16"


def test_stage1_losses_with_cache_equal_without(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"schedule": {"max_steps": 4}, "checkpoint": {"interval": 100}}
    live = run(train_cfg(records, tmp_path / "live", **over))
    cache_dir = tmp_path / "features"
    cached = run(train_cfg(records, tmp_path / "cached", data={"feature_cache": str(cache_dir)}, **over))
    assert len(list(cache_dir.glob("*/meta.json"))) == 2  # one folder per tower
    assert cached["losses"] == pytest.approx(live["losses"], rel=2e-3)
    # the size was estimated and announced before the build; it matches what landed on disk
    log = (tmp_path / "cached" / "train.log").read_text()
    announced = re.findall(
        r"building (\d+) of (\d+) images x \[(\d+), (\d+)\] bf16 = ([\d.]+) KiB in (\S+) \(", log
    )
    assert len(announced) == 2, log
    for todo, total, tokens, width, kib, folder in announced:
        assert todo == total == "16"
        estimate = int(todo) * int(tokens) * int(width) * 2
        assert float(kib) == pytest.approx(estimate / 1024, abs=0.05)
        on_disk = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        assert estimate <= on_disk <= estimate * 1.25  # shard headers are all that is not counted

    def no_build(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(FeatureCache, "build", no_build)
    # a dry run announces what the cache would take, and builds nothing
    planned = tmp_path / "planned"
    run(train_cfg(records, tmp_path / "dry", data={"feature_cache": str(planned)}, **over), dry_run=True)
    log = (tmp_path / "dry" / "train.log").read_text()
    assert len(re.findall(r"would build 16 of 16 images x \[\d+, \d+\] bf16 = ", log)) == 2, log
    assert not list(planned.glob("*/*.safetensors"))
    reused = run(train_cfg(records, tmp_path / "reused", data={"feature_cache": str(cache_dir)}, **over))
    assert reused["losses"] == cached["losses"]

    with pytest.raises(ValueError, match=r"data\.feature_cache is set but stage `full` trains towers"):
        run(
            train_cfg(
                records, tmp_path / "full", stage="full", data={"feature_cache": str(cache_dir)}, **over
            )
        )
