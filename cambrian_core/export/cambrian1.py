"""Import a Cambrian-1 Hugging Face folder (reference §B.1, §B.4, §D.3) into a saved cambrian model.

A Cambrian-1 folder holds ``config.json`` (a LLaMA / Phi-3 config plus the ``mm_*`` and SVA fields), the
tokenizer and the weights under the names ``model.layers.*``, ``lm_head.*`` (the LLM), ``model.mm_projector*``,
``model.vision_sampler*``, ``model.vision_query`` (the connector) and ``model.image_newline``. It never holds
the vision towers: Cambrian-1 re-downloads them by name, so here each tower name is mapped to one of our
encoders built from a local folder or file (``tower_paths``).

The import streams the weights file by file into the output (never the whole model in memory), checks every
name and shape against the architecture the config describes (built on the meta device, allocating
nothing), and writes the folder atomically: on any error nothing is left at the destination.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cambrian_core.export.shards import ShardWriter, iter_state
from cambrian_core.fileio import staged_folder

__all__ = [
    "CAMBRIAN1_CONFIG_KEYS",
    "Cambrian1ImportError",
    "connector_from_cambrian1",
    "import_cambrian1",
    "map_key",
    "tower_config",
]

#: config fields of Cambrian-1 that are not the LLM's (besides every ``mm_*`` field)
CAMBRIAN1_CONFIG_KEYS = frozenset(
    {
        "image_token_len",
        "image_position",
        "image_aspect_ratio",
        "image_grid_pinpoints",
        "num_query_group",
        "query_num_list",
        "connector_depth",
        "vision_hidden_size",
        "connector_only",
        "num_of_vision_sampler_layers",
        "start_of_vision_sampler_layers",
        "stride_of_vision_sampler_layers",
        "vision_tower_aux_list",
        "vision_tower_aux_token_len_list",
        "use_mm_proj",
        "tune_mm_mlp_adapter",
        "freeze_mm_mlp_adapter",
        "unfreeze_mm_vision_tower",
        "tokenizer_model_max_length",
        "tokenizer_padding_side",
        "auto_map",
    }
)
#: Cambrian-1 model types -> (HF model type, HF causal-LM class) of the LLM inside
_LLM_TYPES = {
    "cambrian_llama": ("llama", "LlamaForCausalLM"),
    "cambrian_phi3": ("phi3", "Phi3ForCausalLM"),
    "cambrian_mistral": ("mistral", "MistralForCausalLM"),
    "llava_llama": ("llama", "LlamaForCausalLM"),
}
#: SVA fields copied from config.json into the connector config
_SVA_FIELDS = (
    "vision_hidden_size",
    "num_query_group",
    "query_num_list",
    "connector_depth",
    "connector_only",
    "num_of_vision_sampler_layers",
    "start_of_vision_sampler_layers",
    "stride_of_vision_sampler_layers",
)
#: tokenizer and generation files copied into ``llm/``
_LLM_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
#: buffers some LLaMA checkpoints carry that the model recomputes
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_SUFFIX = re.compile(r"-(res|interp)(\d+)")


class Cambrian1ImportError(ValueError):
    """The Cambrian-1 folder does not fit the architecture its config describes (or is incomplete)."""


def map_key(key: str) -> str:
    """Cambrian-1 state-dict name -> cambrian name (``model.vision_query`` -> ``connector.vision_query`` ...)."""
    if key.startswith("model."):
        rest = key[len("model.") :]
        if rest == "image_newline":
            return "image_newline"
        if rest.startswith(("mm_projector", "vision_sampler", "vision_query")):
            return "connector." + rest
    return "llm.model." + key


def _suffixes(name: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in _SUFFIX.finditer(name)}


def _weights_file(source: Path) -> Path:
    if source.is_file():
        return source
    for name in (
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
        "model.safetensors",
        "pytorch_model.bin",
    ):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(
        f"{source} holds no open_clip / timm weights file (open_clip_model.safetensors, open_clip_pytorch_model.bin, "
        "model.safetensors or pytorch_model.bin); pass the weights file itself"
    )


def _is_hf_folder(source: Path) -> bool:
    return source.is_dir() and (source / "config.json").is_file()


def tower_config(
    name: str,
    source: str | os.PathLike[str] | Mapping[str, Any],
    token_len: int,
    select_layer: int | None = None,
) -> dict[str, Any]:
    """Our encoder config for Cambrian-1 tower ``name`` whose weights are at ``source``.

    Args:
        name: the Cambrian-1 tower name (``openai/clip-vit-large-patch14-336``, ``siglip/CLIP-ViT-SO400M-14-384``,
            ``facebook/dinov2-giant-res378``, ``clip-convnext-XXL-multi-stage`` ...; ``-res<R>`` sets the input
            resolution).
        source: a local HF folder (CLIP / SigLIP / DINOv2), an open_clip folder or weights file (SigLIP trunk,
            ConvNeXt), a ``.json`` file holding an encoder config, or that config as a dict.
        token_len: the tower's entry of ``mm_vision_tower_aux_token_len_list``.
        select_layer: ``mm_vision_select_layer`` (only the HF CLIP tower uses it, as in Cambrian-1).
    """
    if isinstance(source, Mapping):
        cfg = dict(source)
    elif str(source).endswith(".json") and Path(source).is_file():
        cfg = json.loads(Path(source).read_text())
        if not isinstance(cfg, dict) or "type" not in cfg:
            raise ValueError(f"{source}: an encoder config file must hold a JSON object with a `type`")
    else:
        cfg = _named_tower(name, Path(source).expanduser(), select_layer)
    return {**cfg, "token_len": token_len}


def _named_tower(name: str, source: Path, select_layer: int | None) -> dict[str, Any]:
    if not source.exists():
        raise FileNotFoundError(f"tower `{name}`: {source} does not exist")
    res = _suffixes(name).get("res")
    lower = name.lower()
    if "openai/clip" in lower:
        if not _is_hf_folder(source):
            raise ValueError(
                f"tower `{name}` needs a local HF CLIP folder (with config.json); {source} is not one"
            )
        cfg: dict[str, Any] = {
            "type": "clip",
            "path": str(source),
            "select_layer": -2 if select_layer is None else select_layer,
        }
    elif "siglip" in lower:
        if _is_hf_folder(source):
            cfg = {"type": "siglip_hf", "path": str(source)}
        else:
            native = 384 if "384" in name else 224
            cfg = {
                "type": "siglip",
                "model_name": f"vit_so400m_patch14_siglip_{native}",
                "checkpoint": str(_weights_file(source)),
                "image_size": native,
            }
    elif "clip-convnext" in lower:
        large = "-xxl" not in lower and "-l" in lower
        cfg = {
            "type": "convnext",
            "model_name": "convnext_large_d_320" if large else "convnext_xxlarge",
            "checkpoint": str(_weights_file(source)),
            "single_stage": "multi-stage" not in lower,
            "image_size": 1024,
        }
    elif "dinov2" in lower:
        if not _is_hf_folder(source):
            raise ValueError(
                f"tower `{name}` needs a local HF DINOv2 folder (with config.json); {source} is not one"
            )
        cfg = {"type": "dinov2", "path": str(source)}
    else:
        raise ValueError(
            f"tower `{name}` has no built-in mapping (known: openai/clip*, siglip*, clip-convnext*, *dinov2*); pass "
            f"an encoder config instead: --tower-path '{name}=tower.json' with {{\"type\": ..., ...}}"
        )
    if res is not None:
        cfg["image_size"] = res
    return cfg


def connector_from_cambrian1(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Our connector config from Cambrian-1's ``mm_projector_type`` and SVA fields (SVA uses 16 heads, as Cambrian-1)."""
    from cambrian_plugins.connectors.mlp import projector_config

    ptype = cfg.get("mm_projector_type")
    if not isinstance(ptype, str):
        raise Cambrian1ImportError("config.json has no `mm_projector_type` (e.g. 'sva' or 'mlp2x_gelu')")
    if ptype == "sva":
        out = {"type": "sva", "num_heads": 16, "global_context": "mean"}
        out.update({k: cfg[k] for k in _SVA_FIELDS if cfg.get(k) is not None})
        return out
    return projector_config(ptype)


def _llm_family(src: Path, hf_type: str) -> str:
    if hf_type != "llama":
        return "hf_causal_lm"
    text = " ".join(
        (src / f).read_text(errors="ignore")
        for f in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
        if (src / f).is_file()
    )
    if "<|begin_of_text|>" not in text and "<|im_start|>" not in text and (src / "tokenizer.json").is_file():
        text += (src / "tokenizer.json").read_text(errors="ignore")[:2_000_000]
    if "<|begin_of_text|>" in text:
        return "llama3"
    if "<|im_start|>" in text:
        return "hermes_yi"
    return "vicuna"


def _llm_config(src_cfg: Mapping[str, Any]) -> dict[str, Any]:
    model_type = src_cfg.get("model_type", "cambrian_llama")
    hf_type, arch = _LLM_TYPES.get(model_type, (None, None))
    if hf_type is None:
        raise Cambrian1ImportError(
            f"config.json model_type {model_type!r} is not a Cambrian-1 type ({', '.join(_LLM_TYPES)})"
        )
    out = {k: v for k, v in src_cfg.items() if not k.startswith("mm_") and k not in CAMBRIAN1_CONFIG_KEYS}
    out["model_type"] = hf_type
    out["architectures"] = [arch]
    return out


def _llm_kwargs(family: str, template: str | None, dtype: str) -> dict[str, Any]:
    from cambrian_core.registry import LLMS, TEMPLATES, accepted_kwargs

    cls = LLMS.get(family)
    if cls is None:
        raise Cambrian1ImportError(
            f"LLM type {family!r} is not registered; registered: {', '.join(LLMS.names())}"
        )
    name = template or getattr(cls, "default_template", None) or "hf_chat"
    template_cls = TEMPLATES.get(name)
    compat = template_cls is not None and "cambrian1_compat" in accepted_kwargs(template_cls)[0]
    return {
        "type": family,
        "load_weights": False,
        "template": name,
        "cambrian1_compat": compat,
        "dtype": dtype,
    }


def _aliases_of(model: torch.nn.Module) -> dict[str, str]:
    """``{name: first name}`` for parameters reachable under several names (tied weights)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _problem_list(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def _resolve_tower_paths(names: list[str], tower_paths: Mapping[str, Any]) -> list[Any]:
    bases = [_SUFFIX.sub("", n) for n in names]
    chosen, missing = [], []
    for name, base in zip(names, bases, strict=True):
        source = tower_paths.get(name, tower_paths.get(base))
        if source is None:
            missing.append(name)
        chosen.append(source)
    unknown = [k for k in tower_paths if k not in names and k not in bases]
    problems = []
    if missing:
        problems.append(
            "no local weights for the towers "
            + ", ".join(f"`{n}`" for n in missing)
            + " (Cambrian-1 never saved them): pass --tower-path NAME=DIR for each"
        )
    if unknown:
        problems.append(
            "--tower-path names "
            + ", ".join(f"`{n}`" for n in unknown)
            + " are not towers of this model; its towers: "
            + ", ".join(f"`{n}`" for n in names)
        )
    if problems:
        raise Cambrian1ImportError("; ".join(problems))
    return chosen


def import_cambrian1(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    tower_paths: Mapping[str, Any],
    llm_type: str | None = None,
    template: str | None = None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Convert the Cambrian-1 folder ``src`` into a saved cambrian model at ``out`` (``load_model`` reads it).

    Args:
        src: a Cambrian-1 HF folder (``config.json`` with ``mm_*`` fields, tokenizer, weights), e.g. one written by
            ``cambrian export consolidate-tpu``.
        out: destination folder (written atomically).
        tower_paths: tower name (as in ``mm_vision_tower_aux_list``, with or without ``-res``/``-interp``) -> local
            folder / weights file / encoder config (see :func:`tower_config`).
        llm_type: our LLM plugin (default: from the tokenizer: ``llama3``, ``vicuna``, ``hermes_yi``; other
            architectures ``hf_causal_lm``).
        template: chat template (default: the LLM family's, in Cambrian-1 compatible rendering where it has one).
        max_shard_size: largest safetensors shard.
        overwrite: replace an existing ``out``.

    Returns:
        The output folder.

    Raises:
        Cambrian1ImportError: missing config fields or tower paths, unknown / missing / mis-shaped weights (all
            listed by name).
    """
    from cambrian_core import __version__
    from cambrian_core.model.io import _HERE, CONFIG_NAME, FORMAT_VERSION, read_config, read_json
    from cambrian_core.plugins import load_plugins
    from cambrian_core.registry import ENCODERS, MODELS, build

    load_plugins()
    src = Path(src).expanduser().resolve()
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src} is not a Cambrian-1 folder: config.json is missing")
    src_cfg = read_json(cfg_path)
    if not isinstance(src_cfg, dict):
        raise Cambrian1ImportError(f"{cfg_path} holds a JSON {type(src_cfg).__name__}, not a model config")
    names = src_cfg.get("mm_vision_tower_aux_list") or src_cfg.get("vision_tower_aux_list")
    lens = src_cfg.get("mm_vision_tower_aux_token_len_list") or src_cfg.get("vision_tower_aux_token_len_list")
    if not names or not lens or len(names) != len(lens):
        raise Cambrian1ImportError(
            f"{cfg_path}: needs `mm_vision_tower_aux_list` and `mm_vision_tower_aux_token_len_list` of equal length "
            f"(got {names!r} and {lens!r})"
        )
    sources = _resolve_tower_paths(list(names), tower_paths)
    llm_cfg = _llm_config(src_cfg)
    family = llm_type or _llm_family(src, llm_cfg["model_type"])
    dtype = str(src_cfg.get("torch_dtype") or src_cfg.get("dtype") or "float32")
    select_layer = src_cfg.get("mm_vision_select_layer")
    connector = connector_from_cambrian1(src_cfg)

    with staged_folder(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size, always_index=True)
        towers = []
        for t, (name, source, n) in enumerate(zip(names, sources, lens, strict=True)):
            tcfg = tower_config(name, source, int(n), select_layer)
            with torch.random.fork_rng(devices=[]):
                tower = build(ENCODERS, tcfg)
            towers.append({"type": tcfg["type"], **tower.architecture_config()})
            writer.add_all((f"towers.{t}.{k}", v) for k, v in tower.state_dict().items())
            del tower
        llm_dir = tmp / "llm"
        llm_dir.mkdir()
        (llm_dir / "config.json").write_text(json.dumps(llm_cfg, indent=2))
        for f in _LLM_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, llm_dir / f)
        model_cfg = {
            "type": "cambrian",
            "vision_tower_aux_list": towers,
            "vision_tower_aux_token_len_list": [int(n) for n in lens],
            "llm": {**_llm_kwargs(family, template, dtype), "path": _HERE + "llm"},
            "connector": connector,
            "mm_projector_type": None,
            "image_token_len": int(src_cfg.get("image_token_len", 576)),
            "unpad": True,
            "tower_cambrian1_compat": True,  # the towers' features as its connector was trained on
            "stage": "finetune",
            "gradient_checkpointing": False,
        }
        meta = {
            "format": "cambrian",
            "format_version": FORMAT_VERSION,
            "cambrian_version": __version__,
            "model": model_cfg,
            "imported_from": {
                "format": "cambrian1",
                "source": str(src),
                "towers": dict(zip(names, map(str, sources), strict=True)),
            },
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        with torch.device("meta"):
            skeleton = build(MODELS, read_config(tmp))
        expected = {
            k: v for k, v in skeleton.state_dict(keep_vars=True).items() if not k.startswith("towers.")
        }
        aliases = {k: v for k, v in _aliases_of(skeleton).items() if not k.startswith("towers.")}
        del skeleton
        unknown, wrong, written, misfit = [], [], set(), set()
        for path, tensors in iter_state(src):
            for key, t in tensors.items():
                if _IGNORED.search(key):
                    continue
                ours = map_key(key)
                want = expected.get(ours)
                if want is None:
                    unknown.append(f"{key} (from {path.name})")
                elif tuple(want.shape) != tuple(t.shape):
                    wrong.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(want.shape)}")
                    misfit.add(ours)
                elif ours in aliases and aliases[ours] in written:
                    continue
                else:
                    writer.add(ours, t)
                    written.add(ours)
        kept_aliases = {}
        missing = []
        for name in expected:
            if name in written or name in misfit:
                continue
            source = aliases.get(name)
            if source is not None and source in written:
                kept_aliases[name] = source
            elif any(a == name and k in written for k, a in aliases.items()):
                tied = next(k for k, a in aliases.items() if a == name and k in written)
                kept_aliases[name] = tied
            else:
                missing.append(name)
        problems = []
        if missing:
            problems.append(
                _problem_list("weights the model needs but the checkpoint lacks (cambrian names)", missing)
            )
        if unknown:
            problems.append(_problem_list("checkpoint weights this architecture has no place for", unknown))
        if wrong:
            problems.append(_problem_list("checkpoint weights whose shape does not fit", wrong))
        if problems:
            raise Cambrian1ImportError(f"cannot import {src}:\n" + "\n".join(problems))
        writer.finish(aliases=kept_aliases)
        from cambrian_core.export.card import write_model_card

        write_model_card(
            tmp, title=Path(out).name, notes=[f"Imported from the Cambrian-1 folder `{src.name}`."]
        )
    return Path(out).expanduser().resolve()
