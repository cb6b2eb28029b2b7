"""Sharded safetensors, atomic output folders, dtype conversion and model cards."""

from __future__ import annotations

import json
import re

import export_helpers as H
import pytest
import torch
from safetensors import safe_open

from cambrian_core.cli import main
from cambrian_core.export.card import write_model_card
from cambrian_core.export.shards import INDEX_NAME, ShardWriter, read_state
from cambrian_core.fileio import staged_folder
from cambrian_core.model.io import CONFIG_NAME, load_model


def test_shard_writer_respects_the_budget_and_indexes_everything(tmp_path):
    tensors = {f"t{i}": torch.full((100 + i,), float(i)) for i in range(10)}
    tensors["big"] = torch.zeros(1000)  # 4000 bytes: larger than the budget, gets its own shard
    tied = torch.arange(4.0)
    tensors["a"], tensors["view"] = tied, tied[:2]  # shared storage in one file
    w = ShardWriter(tmp_path, max_shard_size=1000)
    w.add_all(tensors.items())
    index = w.finish()
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) > 3 and all(f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == w.total_size
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            keys = list(sf.keys())
            size = sum(sf.get_slice(k).get_shape()[0] * 4 for k in keys)
            assert size <= 1000 or keys == ["big"], (f.name, keys)
    back = read_state(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="`t0` was written twice"):
        w.add("t0", torch.zeros(1))


def test_single_shard_uses_the_plain_hf_name(tmp_path):
    w = ShardWriter(tmp_path, "1MB")
    w.add("x", torch.ones(3))
    assert w.finish() is None
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    with pytest.raises(ValueError, match="not a size like"):
        ShardWriter(tmp_path, "lots")


def test_staged_folder_leaves_nothing_on_failure_and_protects_existing_output(tmp_path):
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="pass --overwrite"), staged_folder(tmp_path / "out"):
        pass
    with staged_folder(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = H.make(H.sva_config())
    return model, model.save_pretrained(str(tmp_path_factory.mktemp("m") / "model"))


def test_convert_dtype_casts_every_float_and_updates_the_config(saved, tmp_path, capsys):
    model, src = saved
    assert (
        main(
            [
                "export",
                "convert-dtype",
                src,
                str(tmp_path / "bf16"),
                "--dtype",
                "bf16",
                "--max-shard-size",
                "200KB",
            ]
        )
        == 0
    )
    out = tmp_path / "bf16"
    assert len(list(out.glob("model-*.safetensors"))) > 1
    cfg = json.loads((out / CONFIG_NAME).read_text())["model"]
    assert cfg["llm"]["dtype"] == "bfloat16" and {t["dtype"] for t in cfg["vision_tower_aux_list"]} == {
        "bfloat16"
    }
    half = load_model(out)
    ref = model.state_dict()
    for k, v in half.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k
    batch = H.inputs(model)
    assert torch.allclose(H.logits(half, batch).float(), H.logits(model, batch), atol=0.1)
    # the output exists now: a second run refuses, --overwrite replaces
    assert main(["export", "convert-dtype", src, str(out), "--dtype", "fp16"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "convert-dtype", str(out), str(out), "--dtype", "fp32", "--overwrite"]) == 0
    assert {v.dtype for v in load_model(out).state_dict().values()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype 'int3' is not supported"):
        from cambrian_core.export.dtype import convert_dtype

        convert_dtype(src, tmp_path / "x", "int3")


def test_model_card_lists_architecture_training_data_and_evaluation(saved, tmp_path):
    model, src = saved
    work = tmp_path / "work"
    folder = work / "model"
    folder.parent.mkdir()
    load_model(src).save_pretrained(str(folder))
    mix = tmp_path / "mix.jsonl"
    mix.write_text("")
    (tmp_path / "mix.manifest.json").write_text(
        json.dumps({"total": 1234, "sources": {"pmc_oa": {"records": 1000}, "vqa_rad": {"records": 234}}})
    )
    step = work / "checkpoints" / "step_00000200"
    step.mkdir(parents=True)
    (step / "config.json").write_text(
        json.dumps({"model": {}, "data": {"train": [str(mix)]}, "optim": {"lr": 2e-5}, "stage": "finetune"})
    )
    (folder / "eval" / "vqa_rad").mkdir(parents=True)
    results = {
        "benchmark": "vqa_rad",
        "split": "test",
        "metrics": {
            "closed_accuracy": {
                "label": "closed accuracy",
                "value": 0.8125,
                "ci": [0.75, 0.87],
                "n": 272,
                "family": "strict",
            }
        },
    }
    (folder / "eval" / "vqa_rad" / "results.json").write_text(json.dumps(results))
    card = write_model_card(folder).read_text()
    assert "| tower 0 | `clip` | token_len=16" in card and "| connector | `sva` |" in card
    assert (
        "| LLM | `llama3` | template=llama_3, model_type=llama, hidden_size=64, num_hidden_layers=4" in card
    )
    assert "## Training config" in card and '"lr": 2e-05' in card
    assert "Total records: 1234" in card and "| vqa_rad | records=234 |" in card
    assert (
        "## Evaluation: vqa_rad / test" in card
        and "| closed accuracy | 81.25 | 75.00 - 87.00 | 272 |" in card
    )
    n = sum(p.numel() for p in model.parameters())
    assert f"| total | {n / 1e3:.2f}K |" in card
    assert (
        main(["export", "card", str(folder), "--eval", str(folder / "eval" / "vqa_rad" / "results.json")])
        == 0
    )
    assert (folder / "README.md").read_text().count("## Evaluation") == 1
    assert (folder / INDEX_NAME).is_file()
    # a named file that is missing or not JSON is an error, not a card without that section
    assert main(["export", "card", str(folder), "--eval", str(folder / "nope.json")]) == 2
    (folder / "notes.txt").write_text("not json")
    assert main(["export", "card", str(folder), "--manifest", str(folder / "notes.txt")]) == 2


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            "drop_shard",
            r"shard model-00002-of-\d+\.safetensors listed in model\.safetensors\.index\.json is missing",
        ),
        (
            "truncate_shard",
            r"model-00002-of-\d+\.safetensors cannot be read as safetensors .* truncated or corrupt",
        ),
        ("no_weight_map", r"model\.safetensors\.index\.json has no `weight_map` object"),
        ("cut_config", r"cambrian_config\.json is not valid JSON"),
        ("newer_config", r"version 99 is not readable by this cambrian .* upgrade cambrian"),
        ("no_model", r"cambrian_config\.json has no `model` section"),
    ],
)
def test_exports_check_the_source_folder_first(saved, tmp_path, capsys, damage, message):
    import shutil

    _, src = saved
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    assert (
        main(
            [
                "export",
                "convert-dtype",
                str(bad),
                str(tmp_path / "tiny"),
                "--dtype",
                "bf16",
                "--max-shard-size",
                "200KB",
            ]
        )
        == 0
    )
    shutil.rmtree(bad)
    shutil.copytree(tmp_path / "tiny", bad)  # several shards
    shard = bad / sorted(p.name for p in bad.glob("model-*.safetensors"))[1]
    config = bad / CONFIG_NAME
    if damage == "drop_shard":
        shard.unlink()
    elif damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "no_weight_map":
        (bad / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    elif damage == "cut_config":
        config.write_text(config.read_text()[:100])
    else:
        meta = json.loads(config.read_text())
        meta.update({"format_version": 99} if damage == "newer_config" else {"model": None})
        config.write_text(json.dumps(meta))
    for command in (
        ["hf", str(bad), str(tmp_path / "hf")],
        ["card", str(bad)],
        ["convert-dtype", str(bad), str(tmp_path / "c"), "--dtype", "fp16"],
    ):
        capsys.readouterr()
        assert main(["export", *command]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(message, err), (command, err)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "c").exists()  # nothing written


def test_saved_folders_get_the_modes_of_the_umask(saved, tmp_path):
    import os
    import stat

    model, _ = saved
    old = os.umask(0o027)
    try:
        folder = model.save_pretrained(str(tmp_path / "shared"))
    finally:
        os.umask(old)
    paths = [tmp_path / "shared", *(tmp_path / "shared").rglob("*")]
    modes = {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()}
    assert modes == {0o750}, folder  # mkdtemp's 0700 would hide the model from the group
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()} == {0o640}


def test_shard_sizes_take_byte_counts_and_binary_units(saved, tmp_path):
    from cambrian_core.export.shards import parse_size

    sizes = ["2GB", "500MB", "10KiB", "1.5GiB", "512 MiB", "1000000", 1000000]
    assert [parse_size(s) for s in sizes] == [
        2 * 10**9,
        500 * 10**6,
        10 * 1024,
        3 * 2**29,
        512 * 2**20,
        10**6,
        10**6,
    ]
    with pytest.raises(ValueError, match=r"max shard size '2XB' is not a size like '2GB', '500MB', '512MiB'"):
        parse_size("2XB")
    model, src = saved
    argv = ["export", "convert-dtype", src, str(tmp_path / "a"), "--dtype", "bf16", "--max-shard-size"]
    assert main([*argv, "200000"]) == 0
    assert len(list((tmp_path / "a").glob("model-*.safetensors"))) > 1
    folder = model.save_pretrained(str(tmp_path / "b"), max_shard_size="200KiB")
    assert len([p for p in (tmp_path / "b").glob("model-*.safetensors")]) > 1, folder


def test_a_cast_that_overflows_fp16_is_refused(tmp_path, capsys, caplog):
    from cambrian_core.export.dtype import check_cast
    from cambrian_core.export.hf import export_hf

    model = H.make(H.mlp_config())
    with torch.no_grad():
        model.llm.model.model.norm.weight[0] = 1e5  # an outlier: fp32 and bf16 hold it, fp16 does not
    src = model.save_pretrained(str(tmp_path / "m"))
    why = (
        "casting `llm.model.model.norm.weight` to float16 turns 1 of its values into inf (max |value| 1e+05; "
        "float16 holds up to 65504); use bf16 instead"
    )
    assert main(["export", "convert-dtype", src, str(tmp_path / "m16"), "--dtype", "fp16"]) == 2
    assert why in capsys.readouterr().err
    with pytest.raises(ValueError, match=re.escape(why)):
        export_hf(src, tmp_path / "hf", fmt="remote", dtype="fp16")
    with pytest.raises(ValueError, match=re.escape(why)):
        load_model(src, dtype="fp16")
    assert not (tmp_path / "m16").exists() and not (tmp_path / "hf").exists()
    assert main(["export", "convert-dtype", src, str(tmp_path / "mbf16"), "--dtype", "bf16"]) == 0
    tiny = torch.full((10,), 1e-9)  # below float16's smallest value: flushed to zero, reported
    assert torch.equal(check_cast("w", tiny, torch.float16), torch.zeros(10, dtype=torch.float16))
    assert "casting `w` to float16 turns 10 of its 10 values into 0" in caplog.text


def test_an_export_written_inside_its_source_copies_only_the_model(saved, tmp_path):
    import shutil

    _, src = saved
    nest = tmp_path / "nest"
    shutil.copytree(src, nest)
    (nest / "README.md").write_text("card")
    for dtype in ("bf16", "fp16"):
        assert main(["export", "convert-dtype", str(nest), str(nest / dtype), "--dtype", dtype]) == 0
    for dtype in ("bf16", "fp16"):
        names = sorted(p.name for p in (nest / dtype).iterdir())
        assert names == sorted(
            [CONFIG_NAME, "README.md", "llm", "model-00001-of-00001.safetensors", INDEX_NAME]
        )
    assert sorted(p.name for p in (nest / "fp16" / "llm").iterdir()) == sorted(
        p.name for p in (nest / "llm").iterdir()
    )
