"""``cambrian export ...``: checkpoint interop (Cambrian-1 import, TPU shard consolidation, Hugging Face export,
LoRA merge, dtype conversion, model cards)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def _tower_paths(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.rpartition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"--tower-path {item!r} is not NAME=DIR (e.g. openai/clip-vit-large-patch14-336=/models/clip)"
            )
        out[name] = path
    return out


def _guarded(fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            out = fn(args)
        except (ValueError, FileExistsError, FileNotFoundError, ImportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if out is not None:
            print(f"wrote {out}")
        return 0

    return run


def _import(args: argparse.Namespace) -> Path:
    from cambrian_core.export.cambrian1 import import_cambrian1

    return import_cambrian1(
        args.src,
        args.out,
        _tower_paths(args.tower_path),
        llm_type=args.llm_type,
        template=args.template,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )


def _consolidate(args: argparse.Namespace) -> Path:
    from cambrian_core.export.tpu import consolidate_tpu

    return consolidate_tpu(
        args.shards_dir,
        args.out,
        pattern=args.pattern,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )


def _hf(args: argparse.Namespace) -> Path:
    from cambrian_core.export.hf import export_hf

    return export_hf(
        args.model,
        args.out,
        fmt=args.format,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )


def _merge(args: argparse.Namespace) -> Path:
    from cambrian_core.export.lora import merge_lora

    return merge_lora(
        args.base, args.adapter, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite
    )


def _dtype(args: argparse.Namespace) -> Path:
    from cambrian_core.export.dtype import convert_dtype

    return convert_dtype(
        args.model, args.out, args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
    )


def _card(args: argparse.Namespace) -> Path:
    from cambrian_core.export.card import CardSources, find_sources, write_model_card
    from cambrian_core.export.dtype import saved_folder
    from cambrian_core.model.io import read_json

    folder, _ = saved_folder(args.model)
    if not Path(args.model).is_dir():
        raise ValueError(
            f"{args.model!r} is a registered checkpoint, not a folder of yours; `export card` writes README.md into "
            "the model folder, so give a saved model folder"
        )
    given = [*([args.training_config] if args.training_config else []), *args.manifest, *args.eval]
    for path in map(Path, given):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        read_json(path)  # a ValueError naming the file when it is not JSON
    found = find_sources(folder)
    sources = CardSources(
        Path(args.training_config) if args.training_config else found.training_config,
        [Path(p) for p in args.manifest] or found.manifests,
        [Path(p) for p in args.eval] or found.evals,
    )
    return write_model_card(folder, sources=sources)


def _common(p: argparse.ArgumentParser, shard: str = "2GB") -> None:
    p.add_argument(
        "--max-shard-size",
        default=shard,
        help=f"largest safetensors shard: 2GB, 500MB, 512MiB or a byte count (default {shard})",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (only once the new one is complete)",
    )


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("export", help="import / consolidate / export / merge checkpoints")
    sub = parser.add_subparsers(dest="export_command", metavar="ACTION", required=True)

    p = sub.add_parser("import-cambrian1", help="a Cambrian-1 HF folder -> a cambrian model folder")
    p.add_argument("src", help="Cambrian-1 folder (config.json with mm_* fields, tokenizer, weights)")
    p.add_argument("out", help="output folder (load it with load_model / --model-path)")
    p.add_argument(
        "--tower-path",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="local weights of a tower named in mm_vision_tower_aux_list (HF folder, open_clip folder or weights "
        "file, or a .json encoder config); repeat per tower",
    )
    p.add_argument("--llm-type", help="LLM plugin (default: from the tokenizer: llama3 / vicuna / hermes_yi)")
    p.add_argument("--template", help="chat template (default: the LLM family's, Cambrian-1 compatible)")
    _common(p)
    p.set_defaults(func=_guarded(_import))

    p = sub.add_parser("consolidate-tpu", help="merge per-rank XLA FSDP shards into one HF-format folder")
    p.add_argument("shards_dir", help="folder with <prefix>_rank-XXXXXXXX-of-YYYYYYYY files")
    p.add_argument("out", help="output folder (a Cambrian-1 HF folder for import-cambrian1)")
    p.add_argument("--pattern", help="which set of rank files, e.g. 'weights_rank-*-of-*-pytorch_model.bin'")
    _common(p, "5GB")
    p.set_defaults(func=_guarded(_consolidate))

    p = sub.add_parser("hf", help="a cambrian model -> a Hugging Face transformers folder")
    p.add_argument("model", help="saved model folder or registered checkpoint name")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--format",
        choices=("auto", "llava", "remote"),
        default="auto",
        help="llava: plain LlavaForConditionalGeneration (one CLIP/SigLIP tower + mlp2x_gelu); remote: "
        "trust_remote_code folder (any model); auto: llava when possible",
    )
    p.add_argument("--dtype", help="cast floating weights (bf16, fp16, fp32)")
    _common(p, "5GB")
    p.set_defaults(func=_guarded(_hf))

    p = sub.add_parser("merge-lora", help="merge a LoRA adapter into the LLM and save a plain model")
    p.add_argument("base", help="saved model folder the adapter was trained on")
    p.add_argument(
        "adapter", help="training checkpoint (step_*/ with trainable.safetensors) or a peft adapter folder"
    )
    p.add_argument("out", help="output folder")
    _common(p)
    p.set_defaults(func=_guarded(_merge))

    p = sub.add_parser("convert-dtype", help="cast a saved model's floating weights")
    p.add_argument("model", help="saved model folder or registered checkpoint name")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", required=True, help="bf16, fp16 or fp32")
    _common(p)
    p.set_defaults(func=_guarded(_dtype))

    p = sub.add_parser("card", help="(re)write a saved model's README.md model card")
    p.add_argument("model", help="saved model folder")
    p.add_argument("--training-config", help="run config JSON (default: found next to the model)")
    p.add_argument("--manifest", action="append", default=[], help="data-mix manifest JSON (repeatable)")
    p.add_argument("--eval", action="append", default=[], help="evaluation results JSON (repeatable)")
    p.set_defaults(func=_guarded(_card))
