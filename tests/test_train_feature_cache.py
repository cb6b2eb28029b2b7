"""Frozen-tower feature cache: built once, reused, stale and partial caches detected, same losses as live towers."""

from __future__ import annotations

import json
import logging
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

    with pytest.raises(ValueError, match=r"data\.feature_cache: is set but stage `full` trains towers"):
        run(
            train_cfg(
                records, tmp_path / "full", stage="full", data={"feature_cache": str(cache_dir)}, **over
            )
        )


def convnext() -> torch.nn.Module:
    torch.manual_seed(0)
    return build(ENCODERS, {"type": "convnext", **ENCODERS.get("convnext").tiny_config()}).eval()


def encode_staged(t: torch.nn.Module, paths: list[Path]):
    return t.forward_staged(torch.stack([t.preprocess(Image.open(p).convert("RGB")) for p in paths]))


def test_staged_cache_stores_a_multi_stage_towers_stages(records: Path, tmp_path: Path) -> None:
    images = {content_hash(p): p for p in sorted((records.parent / "images").glob("*.png"))}
    t = convnext()
    with torch.no_grad():
        live = encode_staged(t, list(images.values()))
    layout = live.layout  # the 16x16 and 8x8 stages shrunk to the 4x4 grid and merged with it, 2x2 kept
    assert len(layout) == 2 and layout[1][1:] == (2, 2)
    cache = FeatureCache(tmp_path, t, staged=True, shard_bytes=3 * sum(c * h * w for c, h, w in layout) * 2)
    assert cache.stages == layout and cache.folder.name.endswith("-staged")
    assert cache.describe() == f"stages {[list(s) for s in layout]}"
    per_image = sum(c * h * w for c, h, w in layout) * 2
    assert cache.estimate_bytes(16) == 16 * per_image < 16 * t.token_len * t.hidden_size * 2
    assert cache.build(images, lambda ps: encode_staged(t, ps), batch_size=5) == 16
    assert len(list(cache.folder.glob("shard_*.safetensors"))) == 6  # 3 images per shard
    on_disk = sum(f.stat().st_size for f in cache.folder.glob("*.safetensors"))
    assert 16 * per_image <= on_disk <= 16 * per_image * 1.25

    hashes = list(images)
    got = cache.batch(hashes[3:7])
    assert got.layout == layout and got.parts[0].shape[0] == 4 and got.dtype == torch.bfloat16
    for a, b in zip(got.parts, live.parts, strict=True):
        torch.testing.assert_close(a.float(), b[3:7], rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # its tokens are the tower's output
        torch.testing.assert_close(
            got.tokens().float(), encode(t, [images[h] for h in hashes[3:7]]), rtol=2e-2, atol=2e-2
        )

    # the token cache of the same tower lives beside it; neither is the other's stale folder
    tokens = FeatureCache(tmp_path, t)
    assert tokens.stages is None and tokens.folder.name == cache.folder.name.removesuffix("-staged")
    assert tokens.build(images, lambda ps: encode(t, ps)) == 16
    assert tokens.status(images).stale == [] and cache.status(images).stale == []
    assert tokens.status(images).complete and FeatureCache(tmp_path, t, staged=True).status(images).complete

    # a tower without stages, or whose stages all land on the output grid (one part: its tokens' numbers), is
    # cached as tokens whatever is asked
    flat = FeatureCache(tmp_path, tower(), staged=True)
    assert flat.stages is None and not flat.folder.name.endswith("-staged")
    coarse = build(ENCODERS, {"type": "convnext", **ENCODERS.get("convnext").tiny_config(), "token_len": 4})
    assert len(coarse.forward_staged(torch.zeros(1, 3, 64, 64)).parts) == 1
    assert FeatureCache(tmp_path, coarse, staged=True).stages is None

    with pytest.raises(
        ValueError, match=r"tower gave features \(5, 16, 80\), the cache expects 5 images of stages"
    ):
        FeatureCache(tmp_path / "other", t, staged=True).build(images, lambda ps: encode(t, ps), batch_size=5)
    meta = json.loads((cache.folder / "meta.json").read_text())
    assert meta["stages"] == [list(s) for s in layout]
    meta["stages"][0][0] += 1
    (cache.folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        StaleCacheError, match=r"holds stages \[\[.*\]\], the tower gives .* delete the folder"
    ):
        FeatureCache(tmp_path, t, staged=True).status(images)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sva_trains_on_cached_stages_with_the_losses_of_the_live_tower(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    from _train_fixtures import tiny_model_cfg

    from cambrian_core.model.encoder import StagedTokens
    from cambrian_core.registry import CONNECTORS

    SVAConnector = CONNECTORS.get("sva")
    model = tiny_model_cfg(connector="sva")
    model["vision_tower_aux_list"][1] = {"type": "convnext", **ENCODERS.get("convnext").tiny_config()}
    seen: list[type] = []
    forward = SVAConnector.forward

    def spy(self, features, *args, **kwargs):
        seen.append(type(features[1]))
        return forward(self, features, *args, **kwargs)

    monkeypatch.setattr(SVAConnector, "forward", spy)
    over = {
        "model": model,
        "schedule": {"max_steps": 3},
        "checkpoint": {"interval": 100},
        "runner": {"type": "single", "device": device},
    }
    live = run(train_cfg(records, tmp_path / "live", **over))
    assert set(seen) == {StagedTokens}
    seen.clear()
    cache_dir = tmp_path / "features"
    cached = run(train_cfg(records, tmp_path / "cached", data={"feature_cache": str(cache_dir)}, **over))
    assert set(seen) == {StagedTokens}  # read from the cache as stages, not as tokens
    folders = sorted(p.name for p in cache_dir.iterdir())
    assert len(folders) == 2 and folders[0].startswith("ClipEncoder-") and folders[1].endswith("-staged"), (
        folders
    )
    assert cached["losses"] == pytest.approx(live["losses"], rel=2e-3)
    log = (tmp_path / "cached" / "train.log").read_text()
    assert re.search(r"building 16 of 16 images x stages \[\[\d+, 4, 4\], \[\d+, 2, 2\]\] bf16 = ", log), log


def test_an_image_that_does_not_decode_is_left_out_of_the_cache_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_dataset(tmp_path / "data", n=12, text_only_every=0)
    bad = tmp_path / "data" / "images" / "3.png"
    bad.write_bytes(bad.read_bytes()[:200])  # the header reads, the pixel data is cut short
    over = {"schedule": {"max_steps": 4}}
    plain = run(train_cfg(data, tmp_path / "plain", **over))
    with caplog.at_level(logging.WARNING):
        cached = run(
            train_cfg(data, tmp_path / "cached", data={"feature_cache": str(tmp_path / "fc")}, **over)
        )
    assert cached["step"] == plain["step"] == 4
    assert cached["skipped"] == plain["skipped"] == {"unreadable image": 1}
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("feature cache: 1 image(s) did not decode") and str(bad) in m for m in said), said
