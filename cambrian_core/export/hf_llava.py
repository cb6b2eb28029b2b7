"""Export a single-tower ``mlp2x_gelu`` model as a plain ``LlavaForConditionalGeneration`` folder (no remote code).

Weights map one to one: the HF tower (CLIP or SigLIP) -> ``model.vision_tower``, ``mm_projector.{0,2}`` ->
``model.multi_modal_projector.linear_{1,2}``, the LLM -> ``model.language_model`` + ``lm_head``. Our image block
ends every grid row with a learned newline; Llava has no such vector, so the newline becomes a token
``<image_newline>`` whose embedding row is that vector, and an image is written in the prompt as ``f`` rows of
``f`` ``<image>`` tokens each followed by ``<image_newline>`` (:func:`expand_image_tokens`). With that layout the
logits are ours. Both added tokens are suppressed in ``generation_config.json`` so generation never emits them.

Limits (checked, with the reason): one tower of type ``clip`` / ``siglip_hf`` with an integer ``select_layer``
(Llava reads ``hidden_states[layer]``), at its native grid and trained resolution (Llava neither interpolates
tokens nor position embeddings), and ``mlp2x_gelu``. Llava keeps every grid row, so images match ours when they
are square (or the model was built with ``unpad=False``); our model drops expand-to-square padding rows of
non-square images. The image processor written (``LlavaImageProcessor``: pad to square with the mean colour,
resize, normalise) matches our preprocessing up to the resize implementation and the rounding of the fill
colour. No ``LlavaProcessor`` is written (``AutoProcessor`` does not load the folder): it expands ``<image>``
into a flat run of image tokens, not the rows-plus-newline layout, so the card shows the tokenizer + image
processor recipe instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cambrian_core.export.shards import ShardWriter
from cambrian_core.model.template import Message

__all__ = [
    "IMAGE_TOKEN",
    "NEWLINE_TOKEN",
    "expand_image_ids",
    "expand_image_tokens",
    "llava_problems",
    "write_llava",
]

IMAGE_TOKEN = "<image>"
NEWLINE_TOKEN = "<image_newline>"
_TOWERS = {"ClipEncoder": "default", "SiglipHFEncoder": "full"}


def expand_image_tokens(prompt: str, grid: int) -> str:
    """Write each ``<image>`` of ``prompt`` as ``grid`` rows of ``grid`` image tokens plus a newline token."""
    return prompt.replace(IMAGE_TOKEN, (IMAGE_TOKEN * grid + NEWLINE_TOKEN) * grid)


def expand_image_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_id: int, newline_id: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our ``[B, L]`` ids with one ``IMAGE_TOKEN_INDEX`` per image -> the exported Llava's ids and mask (right-padded)."""
    from cambrian_core.model.tokenize import IMAGE_TOKEN_INDEX

    block = ([image_id] * grid + [newline_id]) * grid
    rows = []
    for b in range(input_ids.shape[0]):
        keep = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        row: list[int] = []
        for t in keep.tolist():
            row += block if t == IMAGE_TOKEN_INDEX else [t]
        rows.append(row)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids, mask


def llava_problems(model: nn.Module) -> list[str]:
    """Why ``model`` cannot become a plain ``LlavaForConditionalGeneration`` (empty when it can)."""
    from cambrian_plugins.connectors.mlp import MlpGeluProjector

    out = []
    if len(model.towers) != 1:
        out.append(f"Llava has one vision tower; this model has {len(model.towers)}")
    else:
        tower = model.towers[0]
        name = type(tower).__name__
        if name not in _TOWERS:
            out.append(
                f"tower type {name} is not a transformers CLIP / SigLIP vision model (clip, siglip_hf)"
            )
        else:
            if not isinstance(tower.select_layer, int):
                out.append(
                    "the tower takes last_hidden_state (select_layer=None, after the final norm), which Llava cannot "
                    "select; only an integer select_layer maps to vision_feature_layer"
                )
            if tower.token_len != tower.native_grid**2:
                out.append(
                    f"the tower is resized from {tower.native_grid**2} to {tower.token_len} tokens; Llava uses the native grid"
                )
            if tower.image_size != tower.trained_image_size:
                out.append(
                    f"the tower runs at {tower.image_size}px but was built for {tower.trained_image_size}px"
                )
    conn = model.connector
    if not isinstance(conn, MlpGeluProjector) or conn.depth != 2:
        out.append(f"Llava's projector is mlp2x_gelu; this model's connector is {type(conn).__name__}")
    hf = model.llm.model
    if not hasattr(hf, "lm_head") or not hasattr(hf, "model"):
        out.append(f"the LLM {type(hf).__name__} is not a plain transformers causal LM (LoRA not merged?)")
    return out


def _tokenizer_with_image_tokens(model: nn.Module) -> tuple[Any, int, int]:
    tok = copy.deepcopy(model.llm.tokenizer)
    vocab = tok.get_vocab()
    taken = [t for t in (IMAGE_TOKEN, NEWLINE_TOKEN) if t in vocab]
    if taken:
        raise ValueError(
            f"the tokenizer already has {taken}; they would clash with the exported image tokens"
        )
    from tokenizers import AddedToken

    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (IMAGE_TOKEN, NEWLINE_TOKEN)],
        special_tokens=True,
    )
    return tok, tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(NEWLINE_TOKEN)


def _resized(weight: torch.Tensor, rows: int, fill: Mapping[int, torch.Tensor]) -> torch.Tensor:
    out = weight.new_zeros(rows, weight.shape[1])
    out[: weight.shape[0]] = weight
    for i, v in fill.items():
        out[i] = v.to(out.dtype)
    return out


def write_llava(model: nn.Module, folder: Path, max_shard_size: int | str = "5GB") -> dict[str, Any]:
    """Write ``model`` into ``folder`` as a Llava folder; returns ``{"image_token_id", "newline_token_id", "grid",
    "prompt", "bos_in_prompt"}`` (the last two: an example prompt in the LLM's chat format, for the card).

    Raises:
        ValueError: the model is not Llava-representable (every reason listed).
    """
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    problems = llava_problems(model)
    if problems:
        raise ValueError(
            "not exportable as a plain Llava model: " + "; ".join(problems) + " (use --format remote)"
        )
    tower, conn, hf = model.towers[0], model.connector, model.llm.model
    tok, image_id, newline_id = _tokenizer_with_image_tokens(model)
    embed = hf.get_input_embeddings().weight.detach()
    vocab = max(embed.shape[0], image_id + 1, newline_id + 1)
    text_cfg = hf.config.to_dict()
    text_cfg["vocab_size"] = vocab
    dtype_name = str(embed.dtype).removeprefix("torch.")  # what the weights are stored in (--dtype)
    vision_cfg = tower.model.config.to_dict()
    text_cfg["dtype"] = vision_cfg["dtype"] = dtype_name
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    config = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=image_id,
        image_seq_length=tower.token_len,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=_TOWERS[type(tower).__name__],
        vision_feature_layer=int(tower.select_layer),
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype_name
    newline = model.image_newline.detach()
    state: dict[str, torch.Tensor] = {}
    state.update({f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items()})
    proj = conn.mm_projector
    for ours, theirs in ((0, "linear_1"), (2, "linear_2")):
        state[f"model.multi_modal_projector.{theirs}.weight"] = proj[ours].weight.detach()
        state[f"model.multi_modal_projector.{theirs}.bias"] = proj[ours].bias.detach()
    emb = hf.model.get_input_embeddings()
    embed_key = next((f"{n}.weight" for n, m in hf.model.named_modules() if m is emb), None)
    for k, v in hf.model.state_dict().items():
        if k == embed_key:
            v = _resized(v, vocab, {newline_id: newline, image_id: torch.zeros_like(newline)})
        state[f"model.language_model.{k}"] = v
    if not tied:
        state["lm_head.weight"] = _resized(hf.lm_head.weight.detach(), vocab, {})
    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if tied:
        want.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if want[k] != tuple(state[k].shape))
    if missing or extra or wrong or embed_key is None:
        raise ValueError(
            f"the Llava mapping does not fit this transformers version: missing {missing[:10]}, unexpected "
            f"{extra[:10]}, wrong shapes {wrong[:10]}"
        )
    config.save_pretrained(folder)
    gen = (
        GenerationConfig.from_model_config(hf.config)
        if getattr(hf, "generation_config", None) is None
        else copy.deepcopy(hf.generation_config)
    )
    gen.pad_token_id = tok.pad_token_id
    gen.suppress_tokens = sorted({*(gen.suppress_tokens or []), image_id, newline_id})
    gen.save_pretrained(folder)
    tok.save_pretrained(folder)
    size = tower.image_size
    LlavaImageProcessorPil(
        do_pad=True,
        do_resize=True,
        size={"height": size, "width": size},
        do_center_crop=False,
        image_mean=list(tower.image_mean),
        image_std=list(tower.image_std),
    ).save_pretrained(folder)
    writer = ShardWriter(folder, max_shard_size)
    writer.add_all(state.items())
    writer.finish()
    example = [Message("user", f"{IMAGE_TOKEN}\nDescribe the image.")]
    prompt = model.llm.template.render_text(example, add_generation_prompt=True)
    bos = tok.bos_token
    return {
        "image_token_id": image_id,
        "newline_token_id": newline_id,
        "grid": model.grid,
        "prompt": prompt,
        "bos_in_prompt": bool(bos) and prompt.startswith(bos),
    }


def llava_usage(grid: int, prompt: str, bos_in_prompt: bool) -> str:
    """Usage section of the exported Llava folder's card (``prompt``: an example in the LLM's chat format)."""
    special = ", add_special_tokens=False" if bos_in_prompt else ""
    why = "  # the chat format already starts with the BOS token" if bos_in_prompt else ""
    return f"""Plain transformers, no remote code. Write every image in the prompt as {grid} rows of {grid} `<image>`
tokens, each row followed by `<image_newline>` (the model's learned row separator), and pass the pixel values:

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained(FOLDER)
tok, images = AutoTokenizer.from_pretrained(FOLDER), AutoImageProcessor.from_pretrained(FOLDER)
PROMPT = {prompt!r}
prompt = PROMPT.replace("<image>", ("<image>" * {grid} + "<image_newline>") * {grid})
inputs = tok(prompt, return_tensors="pt"{special}){why}
pixels = images(Image.open(PATH).convert("RGB"), return_tensors="pt").pixel_values
out = model.generate(**inputs, pixel_values=pixels, max_new_tokens=64, do_sample=False)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

`PROMPT` is a conversation in the LLM's chat format with one `<image>` per image (the example above is what the
model was trained with). Images are used as their full square grid (ours drops the expand-to-square padding
rows of non-square images, so results match exactly for square images).

`AutoProcessor` / `LlavaProcessor` are not supported with this folder (it has no `processor_config.json`): the
stock processor writes an image as one flat run of `<image>` tokens, without the `<image_newline>` token that
ends each row here, so its inputs would not be the ones this model was exported for. Use the tokenizer and the
image processor as above."""
