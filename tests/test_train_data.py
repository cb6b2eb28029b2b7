"""Training data: lazy offset-indexed JSONL, skip-and-report, truncation that never cuts an image, batching."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_fixtures import write_dataset
from PIL import Image

from cambrian_core.train import data as data_mod
from cambrian_core.train.collate import Collator, pack_rows
from cambrian_core.train.data import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    JsonlIndex,
    LazySupervisedDataset,
    Skipped,
    SkipReport,
)
from cambrian_core.train.sampler import GroupedBatchSampler


def toy_tokenize(rec: dict) -> tuple[list[int], list[int], int]:
    """Characters -> ids; the question never trains, the answer does; `<image>` -> one sentinel."""
    conv = rec["conversations"]
    if conv[0]["from"] != "human":
        raise type("MaskingError", (ValueError,), {})("the first turn must be human")
    q, a = conv[0]["value"], conv[1]["value"]
    n = q.count("<image>")
    q_ids = [IMAGE_TOKEN_INDEX] * n + [ord(c) % 200 + 1 for c in q.replace("<image>", "")]
    a_ids = [ord(c) % 200 + 1 for c in a]
    return q_ids + a_ids, [IGNORE_INDEX] * len(q_ids) + a_ids, n


def test_index_offsets_and_lazy_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.jsonl"
    rows = [
        {
            "id": i,
            "conversations": [{"from": "human", "value": "q" * 500}, {"from": "gpt", "value": f"answer {i}"}],
        }
        for i in range(2000)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line is not a sample
    index = JsonlIndex([path], cache_dir=tmp_path / "idx")
    assert len(index) == 2000
    assert index.offsets[1] == len(json.dumps(rows[0])) + 1
    assert (index.text_lengths > 125).all()

    read = {"bytes": 0}
    real_open = builtins.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def seek(self, pos):
            return self.f.seek(pos)

        def readline(self):
            line = self.f.readline()
            read["bytes"] += len(line)
            return line

    monkeypatch.setattr(data_mod, "open", lambda p, m="r": Counting(real_open(p, m)), raising=False)
    ds = LazySupervisedDataset(index, toy_tokenize, max_length=4096)
    assert ds.read_record(1234)["id"] == 1234
    assert ds.read_record(7)["id"] == 7
    # two lines read, not the ~1 MB file
    assert read["bytes"] == len(json.dumps(rows[1234])) + 1 + len(json.dumps(rows[7])) + 1

    # the index is cached and reused (same arrays, no rescan)
    cached = list((tmp_path / "idx").glob("big-*.npz"))
    assert len(cached) == 1
    monkeypatch.setattr(JsonlIndex, "_scan", staticmethod(lambda p: pytest.fail("rescanned")))
    again = JsonlIndex([path], cache_dir=tmp_path / "idx")
    np.testing.assert_array_equal(again.offsets, index.offsets)


def test_bad_samples_are_skipped_and_counted_never_replaced(tmp_path: Path) -> None:
    data = write_dataset(tmp_path, n=6, text_only_every=0)
    lines = data.read_text().splitlines()
    bad_order = json.loads(lines[3])
    bad_order["conversations"] = bad_order["conversations"][::-1]
    two_markers = json.loads(lines[5])
    two_markers["conversations"][0]["value"] = "<image> <image> twice"
    lines[1] = lines[1][:40]  # malformed JSON
    lines[2] = lines[2].replace("images/2.png", "images/missing.png")
    lines[3] = json.dumps(bad_order)
    lines[5] = json.dumps(two_markers)
    data.write_text("\n".join(lines) + "\n")
    ds = LazySupervisedDataset(
        JsonlIndex([data]), toy_tokenize, transforms=[lambda im: torch.zeros(3, 8, 8)], image_tokens=5
    )
    items = [ds[i] for i in range(len(ds))]
    reasons = {i: it.reason for i, it in enumerate(items) if isinstance(it, Skipped)}
    assert reasons == {
        1: "malformed line",
        2: "missing image",
        3: "masking error",
        5: "image count mismatch",
    }
    assert "missing.png" in items[2].detail
    batch = Collator(pad_token_id=0)(items)
    assert batch["indices"] == [0, 4]  # the good samples, each once, nothing substituted
    assert batch["num_samples"] == 2 and len(batch["skipped"]) == 4
    report = SkipReport()
    for s in batch["skipped"]:
        report.add(s)
    assert report.total == 4
    assert report.summary().startswith("4 skipped: ")
    assert "missing image x1 (#2: " in report.summary()
    # the pixel-free check finds the same samples; places are file and line
    assert {i: ds.check(i).reason for i in range(len(ds)) if ds.check(i) is not None} == reasons
    assert ds.where(2) == f"{data} line 3"
    named = SkipReport()
    named.add(items[2], ds.where)
    assert (
        named.details().startswith(f"missing image x1 ({data} line 3: ") and "missing.png" in named.details()
    )


def test_sample_places_count_blank_lines(tmp_path: Path) -> None:
    data = write_dataset(tmp_path, n=4, text_only_every=0)
    lines = data.read_text().splitlines()
    data.write_text("\n\n".join(lines) + "\n")  # a blank line between records: not samples, but lines
    ds = LazySupervisedDataset(JsonlIndex([data]), toy_tokenize, image_tokens=5)
    assert len(ds) == 4
    assert [ds.where(i) for i in range(4)] == [f"{data} line {n}" for n in (1, 3, 5, 7)]
    assert [ds.check(i) for i in range(4)] == [None] * 4


def test_truncation_never_cuts_an_image(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "b.png")
    rec = {
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "ab<image>cd<image>ef"},
            {"from": "gpt", "value": "x" * 10},
        ],
    }
    (tmp_path / "r.jsonl").write_text(json.dumps(rec) + "\n")
    index = JsonlIndex([tmp_path / "r.jsonl"])
    make = lambda n: LazySupervisedDataset(  # noqa: E731
        index, toy_tokenize, transforms=[lambda im: torch.zeros(3, 4, 4)], image_tokens=10, max_length=n
    )
    # ids: I I a b c d e f x*10 -> sentinels first (toy tokenizer); lengths: 10 + 10 + 6 + 10 = 36
    full = make(64)[0]
    assert full["length"] == 36 and full["pixel_values"][0].shape[0] == 2
    cut = make(30)[0]  # 30 positions: both images (20) + 6 text + 4 answer tokens
    assert cut["length"] == 30 and len(cut["input_ids"]) == 12 and cut["pixel_values"][0].shape[0] == 2
    one = make(15)[0]  # the second image would straddle position 15: dropped with everything after
    assert isinstance(one, Skipped) and one.reason == "no target tokens within max_length=15"

    rec["conversations"][0]["value"] = "<image>ab<image>"
    rec["conversations"][1]["value"] = "y" * 3
    (tmp_path / "r.jsonl").write_text(json.dumps(rec) + "\n")
    index = JsonlIndex([tmp_path / "r.jsonl"])
    ds = LazySupervisedDataset(
        index,
        lambda r: (
            [IMAGE_TOKEN_INDEX, 5, 5, 7, 7, 7, IMAGE_TOKEN_INDEX, 9],
            [IGNORE_INDEX] * 3 + [7, 7, 7, IGNORE_INDEX, IGNORE_INDEX],
            2,
        ),
        transforms=[lambda im: torch.zeros(3, 4, 4)],
        image_tokens=10,
        max_length=16,
    )
    s = ds[0]
    assert s["input_ids"].tolist() == [IMAGE_TOKEN_INDEX, 5, 5, 7, 7, 7]  # cut before the second image
    assert s["pixel_values"][0].shape[0] == 1 and s["image_sizes"].shape == (1, 2) and s["length"] == 15


def test_collator_pads_dynamically_and_packs() -> None:
    def sample(i: int, n: int, images: int = 0) -> dict:
        ids = torch.arange(1, n + 1)
        ids[:images] = IMAGE_TOKEN_INDEX
        return {
            "index": i,
            "input_ids": ids,
            "labels": torch.where(ids > 0, ids, IGNORE_INDEX),
            "image_sizes": torch.full((images, 2), 8),
            "pixel_values": [torch.full((images, 3, 2, 2), float(i)) if images else None],
            "length": n + images * 9,
        }

    items = [sample(0, 5, 1), sample(1, 3), sample(2, 9, 1)]
    b = Collator(pad_token_id=0, pad_to_multiple_of=4)(items)
    assert b["input_ids"].shape == (3, 12)  # longest is 9, rounded up to 12, not max_length
    assert b["attention_mask"].sum(1).tolist() == [5, 3, 9]
    assert (b["labels"][1, 3:] == IGNORE_INDEX).all()
    assert b["pixel_values"][0][:, 0, 0, 0].tolist() == [0.0, 2.0]  # images in sentinel order
    assert b["num_tokens"] == 14 + 3 + 18 and b["sample_lengths"] == [14, 3, 18]

    assert pack_rows([14, 3, 18], 20) == [[0, 1], [2]]
    p = Collator(pad_token_id=0, packing=True, max_length=20)(items)
    assert p["input_ids"].shape[0] == 2
    assert p["indices"] == [0, 1, 2]
    assert p["position_ids"][0, :8].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert p["pixel_values"][0][:, 0, 0, 0].tolist() == [0.0, 2.0]
    text_only = Collator(pad_token_id=0)([sample(1, 3)])
    assert "pixel_values" not in text_only


def test_sampler_groups_by_length_splits_ranks_and_resumes() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, 400)
    has_image = rng.random(400) < 0.7
    s = GroupedBatchSampler(lengths, 4, has_image, world_size=2, rank=0, seed=3)
    other = GroupedBatchSampler(lengths, 4, has_image, world_size=2, rank=1, seed=3)
    mine, theirs = list(s), list(other)
    assert len(mine) == len(theirs) == len(s)
    flat = [i for b in mine + theirs for i in b]
    assert len(flat) == len(set(flat)) == 8 * len(s) > 400 - 16  # no repeats; only partial batches dropped
    for a, b in zip(mine, theirs, strict=True):  # one global batch never mixes modalities
        assert len({bool(has_image[i]) for i in a + b}) == 1
    spread = np.mean([np.ptp(lengths[b]) for b in mine])
    plain = GroupedBatchSampler(lengths, 4, has_image, group_by_length=False, world_size=2, rank=0, seed=3)
    assert spread < 0.25 * np.mean([np.ptp(lengths[b]) for b in plain])
    assert list(GroupedBatchSampler(lengths, 4, has_image, world_size=2, rank=0, seed=3)) == mine

    resumed = GroupedBatchSampler(lengths, 4, has_image, world_size=2, rank=0, seed=3)
    resumed.load_state_dict(s.state_dict(consumed_batches=17))
    assert list(resumed) == mine[17:]
    assert list(resumed) == mine  # the next pass starts the epoch from its beginning
    s.set_epoch(1)
    assert list(s) != mine
    with pytest.raises(ValueError, match="saved with seed 3, this run uses 4"):
        GroupedBatchSampler(lengths, 4, seed=4).load_state_dict(
            {"epoch": 0, "consumed_batches": 1, "seed": 3}
        )
    with pytest.raises(ValueError, match="cannot fill one global batch of 8"):
        GroupedBatchSampler([5, 6, 7], 4, world_size=2)
    with pytest.raises(
        ValueError, match=r"of 4 \(batch_size 4 x world_size 1\): 3 with images and 3 text-only"
    ):
        GroupedBatchSampler([5] * 6, 4, has_image=[True] * 3 + [False] * 3)
    # a position is only meaningful under the batch layout that made it
    state = GroupedBatchSampler(lengths, 4, seed=3).state_dict(consumed_batches=2)
    with pytest.raises(ValueError, match=r"another layout \(batch_size 4 -> 2; world_size 1 -> 2\)"):
        GroupedBatchSampler(lengths, 2, world_size=2, seed=3).load_state_dict(state)


def test_the_samples_an_epoch_leaves_out_are_random_not_the_shortest() -> None:
    lengths = np.arange(100, 220)  # 120 samples, one modality: 8 are left out each epoch (global batch 16)
    s = GroupedBatchSampler(lengths, 8, world_size=2, rank=0, seed=1)
    other = GroupedBatchSampler(lengths, 8, world_size=2, rank=1, seed=1)
    assert s.left_out() == {"image": 0, "text": 8}
    seen: set[int] = set()
    for epoch in range(6):
        s.set_epoch(epoch)
        other.set_epoch(epoch)
        used = {i for b in [*s, *other] for i in b}
        assert len(used) == 112
        seen |= used
    assert (
        len(seen) == 120
    )  # every sample trains in some epoch; the 8 shortest are not always the ones left out
    assert GroupedBatchSampler(lengths, 8, drop_last=False).left_out() == {"image": 0, "text": 0}


def test_an_unpadded_sampler_gives_every_sample_once() -> None:
    has_image = np.array([True, True, False, True, False])
    padded = list(
        GroupedBatchSampler([5] * 5, 2, has_image, group_by_length=False, shuffle=False, drop_last=False)
    )
    # image 3's batch wraps around the images (0), not the epoch (2 is text-only): one modality per batch
    assert sorted(i for b in padded for i in b) == [0, 0, 1, 2, 3, 4] and [3, 0] in padded
    exact = GroupedBatchSampler(
        [5] * 5, 2, has_image, group_by_length=False, shuffle=False, drop_last=False, pad=False
    )
    batches = list(exact)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4] and len(exact) == len(batches) == 3
    assert [len(b) for b in batches] == [2, 2, 1]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [5, 7, 12])
def test_exact_batches_count_every_sample_once_across_ranks_in_lock_step(world_size: int, n: int) -> None:
    has_image = np.arange(n) % 3 != 2  # both modalities, so leftovers of each are merged and padded
    plans = [
        GroupedBatchSampler(
            [5] * n,
            2,
            has_image,
            group_by_length=False,
            shuffle=False,
            world_size=world_size,
            rank=r,
            drop_last=False,
        ).exact_batches()
        for r in range(world_size)
    ]
    assert len({len(p) for p in plans}) == 1  # every rank runs the same number of forwards
    counted = sorted(i for p in plans for indices, counts in p if counts for i in indices)
    assert counted == list(range(n))
    for p in plans:
        assert all(indices and len(indices) <= 2 for indices, _ in p)
    if world_size == 1:
        assert all(counts for _, counts in plans[0])
    if (n, world_size) == (5, 2):  # images [0, 1, 3, 4] fill a batch; text [2] is padded to [2, 2, 2, 2]
        assert plans == [
            [([0, 3], True), ([2], True)],
            [([1, 4], True), ([2, 2], False)],  # rank 1's share is all repeats: run, not counted
        ]
    for p in zip(*plans, strict=True):  # one modality per global batch: the ranks run the same modules
        assert len({i % 3 != 2 for indices, _ in p for i in indices}) == 1
