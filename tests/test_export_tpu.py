"""``consolidate-tpu``: per-rank XLA FSDP shards (written here the way torch_xla's FSDP does) -> one folder."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import export_helpers as H
import pytest
import torch
import torch.nn.functional as F

from cambrian_core.cli import main
from cambrian_core.export.cambrian1 import import_cambrian1
from cambrian_core.export.shards import read_state
from cambrian_core.export.tpu import TPUConsolidationError, consolidate_tpu
from cambrian_core.model.io import load_model

SEP = "_FSDP_SHARD_SEPARATOR_"
WRAPPED = "_fsdp_wrapped_module"


def _shard(t: torch.Tensor, world: int, dim0: bool, multiple: int) -> list[torch.Tensor]:
    """XLA FSDP ``_get_shard``: flatten (or keep dim 0), pad to a multiple of ``world * multiple``, split."""
    if dim0 and t.dim() > 1:
        pad = (-t.shape[0]) % world
        t = F.pad(t, [0, 0] * (t.dim() - 1) + [0, pad])
        return [c.clone() for c in t.chunk(world, dim=0)]
    flat = t.flatten()
    pad = (-flat.numel()) % (world * multiple)
    flat = F.pad(flat, [0, pad])
    return [c.clone() for c in flat.chunk(world)]


def xla_fsdp_checkpoints(
    state: dict[str, torch.Tensor],
    world: int,
    nested: list[str],
    flatten: bool,
    dim0: bool = False,
    multiple: int = 4,
    buffers: dict[str, tuple[torch.Tensor, torch.dtype]] | None = None,
) -> list[dict[str, Any]]:
    """Each rank's ``{"model": fsdp.state_dict(), "shard_metadata": fsdp.get_shard_metadata()}`` for a root FSDP over
    the model with one nested FSDP per prefix in ``nested`` (``flatten_parameters=flatten``)."""
    groups: dict[str, dict[str, torch.Tensor]] = {p: {} for p in nested}
    root: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        owner = next((p for p in nested if name.startswith(p + ".")), None)
        if owner is None:
            root[name] = t
        else:
            groups[owner][name[len(owner) + 1 :]] = t
    payloads = [{"model": OrderedDict(), "shard_metadata": {}} for _ in range(world)]
    shard_info: dict[str, dict[str, Any]] = {}
    flatten_info: dict[str, Any] = {}

    def wrap(module_path: str, params: dict[str, torch.Tensor], key_prefix: str) -> None:
        """One FSDP module at ``module_path`` (relative to the root FSDP) owning ``params`` (relative names)."""
        if flatten:
            names = list(params)
            flat = torch.cat([params[n].flatten() for n in names])
            entries = {f"{WRAPPED}.flat_param_0": flat}
            base = f"{module_path}.{WRAPPED}" if module_path else WRAPPED
            flatten_info[f"{base}.flat_param_0"] = (
                names,
                [torch.Size(params[n].shape) for n in names],
                [params[n].numel() for n in names],
            )
        else:
            entries = {f"{WRAPPED}.{n}": t for n, t in params.items()}
        info = {}
        for orig, t in entries.items():
            pname = f"_fsdp_shard.{orig}".replace(".", SEP)
            info[pname] = {"_orig_size": torch.Size(t.shape), "_orig_name": orig}
            for r, piece in enumerate(_shard(t, world, dim0 and not flatten, multiple)):
                payloads[r]["model"][key_prefix + pname] = piece
        shard_info[module_path] = info

    wrap("", {k: v for k, v in root.items()}, "")
    for p in nested:
        wrap(f"{WRAPPED}.{p}", groups[p], f"{WRAPPED}.{p}.")
    buffer_info = {}
    for name, (value, orig) in (buffers or {}).items():
        key = f"{WRAPPED}.{name}"
        buffer_info[key] = {"_orig_dtype": orig}
        for payload in payloads:
            payload["model"][key] = value.clone()
    for r, payload in enumerate(payloads):
        payload["shard_metadata"] = {
            "shard_info": shard_info,
            "flatten_info": flatten_info,
            "buffer_info": buffer_info,
            "world_size": world,
            "rank": r,
        }
    return payloads


def write_ranks(payloads: list[dict[str, Any]], folder: Path, prefix: str = "model_ckpt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w = len(payloads)
    for r, payload in enumerate(payloads):
        torch.save(payload, folder / f"{prefix}_rank-{r:08d}-of-{w:08d}.pth")
    return folder


@pytest.fixture(scope="module")
def model():
    return H.make(H.mlp_config())


@pytest.fixture(scope="module")
def state(model):
    return H.cambrian1_state(model)


NESTED = ["model.layers.0", "model.layers.1", "model.layers.3"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["flatten", "per_param", "dim0"])
def test_round_trip_recovers_every_tensor(tmp_path, state, world, mode):
    buffers = {"model.extra_buffer": (torch.arange(6, dtype=torch.bfloat16), torch.float32)}
    payloads = xla_fsdp_checkpoints(
        state, world, NESTED, flatten=mode == "flatten", dim0=mode == "dim0", buffers=buffers
    )
    assert all("model.layers.0.self_attn.q_proj.weight" not in p["model"] for p in payloads)  # really sharded
    src = write_ranks(payloads, tmp_path / "ckpt")
    (src / "config.json").write_text("{}")
    out = consolidate_tpu(src, tmp_path / "full", max_shard_size="100KB")
    got = read_state(out)
    assert set(got) == set(state) | {"model.extra_buffer"}
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert got["model.extra_buffer"].dtype == torch.float32  # cast back by buffer_info
    assert (out / "config.json").is_file() and not list(out.glob("*rank-*"))
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "consolidation.json").read_text())["world_size"] == world


def test_consolidate_then_import_gives_the_same_model(tmp_path, model):
    ref = H.write_cambrian1(model, tmp_path / "ref", [H.CLIP_NAME], shards=1)
    towers = H.save_towers(model, tmp_path)
    payloads = xla_fsdp_checkpoints(H.cambrian1_state(model), 4, NESTED, flatten=True)
    src = write_ranks(payloads, tmp_path / "tpu_out")
    for f in ref.iterdir():  # the TPU output folder also holds config.json and the tokenizer
        if not f.name.endswith(("safetensors", ".index.json")):
            (src / f.name).write_bytes(f.read_bytes())
    assert main(["export", "consolidate-tpu", str(src), str(tmp_path / "hf")]) == 0
    imported = import_cambrian1(tmp_path / "hf", tmp_path / "ours", {H.CLIP_NAME: towers[0]})
    batch = H.inputs(model)
    assert torch.equal(H.logits(model, batch), H.logits(load_model(imported), batch))


def test_the_optimizer_and_rng_files_are_not_mistaken_for_weights(tmp_path, state):
    src = write_ranks(xla_fsdp_checkpoints(state, 2, [], flatten=True), tmp_path / "ckpt", prefix="weights")
    for r in range(2):
        torch.save(
            {"optimizer_state": {}, "shard_metadata": {}},
            src / f"opt_rank-{r:08d}-of-00000002-pytorch_model.bin",
        )
    out = consolidate_tpu(src, tmp_path / "full")
    assert set(read_state(out)) == set(state)


def _expect_failure(src: Path, out: Path, match: str) -> None:
    with pytest.raises((TPUConsolidationError, FileNotFoundError), match=match):
        consolidate_tpu(src, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp folder left


def test_missing_ranks_are_listed(tmp_path, state):
    src = write_ranks(xla_fsdp_checkpoints(state, 4, NESTED, flatten=True), tmp_path / "ckpt")
    (src / "model_ckpt_rank-00000001-of-00000004.pth").unlink()
    (src / "model_ckpt_rank-00000003-of-00000004.pth").unlink()
    _expect_failure(src, tmp_path / "full", r"missing ranks 1, 3 of 4")


def test_ranks_from_different_world_sizes_are_refused(tmp_path, state):
    src = write_ranks(xla_fsdp_checkpoints(state, 2, [], flatten=True), tmp_path / "ckpt")
    write_ranks(xla_fsdp_checkpoints(state, 4, [], flatten=True)[:1], tmp_path / "other")
    (tmp_path / "other" / "model_ckpt_rank-00000000-of-00000001.pth").rename(
        src / "model_ckpt_rank-00000002-of-00000004.pth"
    )
    _expect_failure(src, tmp_path / "full", r"disagree on the world size")


def test_a_key_missing_on_one_rank_is_named(tmp_path, state):
    payloads = xla_fsdp_checkpoints(state, 2, NESTED, flatten=False)
    victim = next(k for k in payloads[1]["model"] if "q_proj" in k)
    del payloads[1]["model"][victim]
    _expect_failure(write_ranks(payloads, tmp_path / "ckpt"), tmp_path / "full", f"rank 1 lacks {victim}")


def test_a_parameter_no_rank_holds_is_named(tmp_path, state):
    payloads = xla_fsdp_checkpoints(state, 2, NESTED, flatten=False)
    victim = next(k for k in payloads[0]["model"] if k.endswith("lm_head" + SEP + "weight"))
    for p in payloads:
        del p["model"][victim]
    _expect_failure(
        write_ranks(payloads, tmp_path / "ckpt"), tmp_path / "full", "no rank holds a shard of: .*lm_head"
    )


def test_shard_shape_mismatch_is_named(tmp_path, state):
    payloads = xla_fsdp_checkpoints(state, 2, NESTED, flatten=True)
    victim = next(k for k in payloads[1]["model"] if k.startswith(f"{WRAPPED}.model.layers.1."))
    payloads[1]["model"][victim] = payloads[1]["model"][victim][:-3]
    _expect_failure(
        write_ranks(payloads, tmp_path / "ckpt"), tmp_path / "full", "shard shapes differ across ranks"
    )


def test_metadata_rank_must_match_the_file_name(tmp_path, state):
    payloads = xla_fsdp_checkpoints(state, 2, [], flatten=True)
    payloads[0]["shard_metadata"]["rank"], payloads[1]["shard_metadata"]["rank"] = 1, 0
    _expect_failure(
        write_ranks(payloads, tmp_path / "ckpt"), tmp_path / "full", "shard_metadata says rank 1 of 2"
    )


def test_pickled_objects_are_refused(tmp_path, state):
    payloads = xla_fsdp_checkpoints(state, 2, [], flatten=True)
    payloads[0]["shard_metadata"]["opaque"] = Path("x")  # not a plain container
    _expect_failure(write_ranks(payloads, tmp_path / "ckpt"), tmp_path / "full", "objects other than tensors")


def test_a_folder_without_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect_failure(tmp_path / "empty", tmp_path / "full", "no per-rank shard files")


def test_a_rank_given_twice_is_named(tmp_path, state):
    src = write_ranks(xla_fsdp_checkpoints(state, 2, [], flatten=True), tmp_path / "ckpt")
    (src / "model_ckpt_rank-1-of-2.pth").write_bytes(
        (src / "model_ckpt_rank-00000001-of-00000002.pth").read_bytes()
    )
    _expect_failure(src, tmp_path / "full", r"ranks 1 appear more than once")


def test_a_parameter_produced_twice_is_named(tmp_path, state):
    payloads = xla_fsdp_checkpoints(state, 2, NESTED, flatten=False)
    meta = payloads[0]["shard_metadata"]["shard_info"][f"{WRAPPED}.model.layers.0"]
    shard = next(s for s, info in meta.items() if "q_proj" in info["_orig_name"])
    # the same parameter also saved unsharded (a module wrapped twice, or a stale key)
    name = f"{WRAPPED}.model.layers.0.{meta[shard]['_orig_name']}"
    for p in payloads:
        p["model"][name] = state["model.layers.0.self_attn.q_proj.weight"].clone()
    _expect_failure(
        write_ranks(payloads, tmp_path / "ckpt"),
        tmp_path / "full",
        r"parameters produced more than once: model\.layers\.0\.self_attn\.q_proj\.weight \(from ",
    )


def test_unsharded_entries_that_differ_between_ranks_are_named(tmp_path, state):
    buffers = {"model.extra_buffer": (torch.arange(6, dtype=torch.float32), torch.float32)}
    payloads = xla_fsdp_checkpoints(state, 2, NESTED, flatten=True, buffers=buffers)
    payloads[1]["model"][f"{WRAPPED}.model.extra_buffer"] += 1  # rank 1 saved at another step
    _expect_failure(
        write_ranks(payloads, tmp_path / "ckpt"),
        tmp_path / "full",
        rf"unsharded entries that differ between ranks .*: {WRAPPED}\.model\.extra_buffer",
    )


def test_a_truncated_rank_file_is_named(tmp_path, state):
    src = write_ranks(xla_fsdp_checkpoints(state, 2, [], flatten=True), tmp_path / "ckpt")
    rank = src / "model_ckpt_rank-00000001-of-00000002.pth"
    rank.write_bytes(rank.read_bytes()[: rank.stat().st_size // 2])
    with pytest.raises(
        ValueError,
        match=r"model_ckpt_rank-00000001-of-00000002\.pth cannot be read by torch\.load .* truncated",
    ):
        consolidate_tpu(src, tmp_path / "full")
    assert not (tmp_path / "full").exists()
