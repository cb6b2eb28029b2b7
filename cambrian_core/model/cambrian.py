"""The composed Cambrian model: vision towers + connector + LLM, built from one config (reference §B).

``model = dict(type="cambrian", vision_tower_aux_list=[dict(type="siglip", ...), ...], image_token_len=576,
connector=dict(type="sva", ...), llm=dict(type="llama3", ...))``. Each ``<image>`` sentinel in a sample is
replaced, at its own position, by that image's block (the real rows of the ``f x f`` grid, each ending with a
learned newline; unpadding is the same in training and inference). The connector's in-LLM samplers run after
their scheduled decoder layers on each image's own block. No call stores anything on the model.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from cambrian_core.model.attention import VARLEN_ATTENTION, segment_bounds
from cambrian_core.model.checks import STAGES, check_model_config, connector_config
from cambrian_core.model.connector import Connector
from cambrian_core.model.encoder import StagedTokens
from cambrian_core.model.llm import LanguageModel
from cambrian_core.model.masks import grid_masks, real_extents
from cambrian_core.model.samplers import SamplerContext, activate, install_hooks, recompute_context
from cambrian_core.model.splice import SplicedBatch, build_image_blocks, splice
from cambrian_core.model.stages import group_of, parameter_table
from cambrian_core.model.template import IMAGE_TOKEN, Message
from cambrian_core.model.tokenize import to_messages, tokenize_conversation
from cambrian_core.registry import CONNECTORS, ENCODERS, LLMS, build

__all__ = ["CambrianModel", "Prefill", "register"]

log = logging.getLogger(__name__)


class Prefill(NamedTuple):
    """What :meth:`CambrianModel.prefill` hands to a decoding loop."""

    logits: torch.Tensor  #: ``[B, V]`` fp32 logits of the next token
    cache: Any  #: the LLM's KV cache (transformers ``Cache``) over the spliced, left-padded prompts
    attention_mask: torch.Tensor  #: ``[B, L']`` (0 = left padding)
    positions: torch.Tensor  #: ``[B]`` position of each row's next token (its real prompt length)


def _plain(value: Any) -> Any:
    """Deep copy of a config value as plain dicts / lists (mmengine ConfigDicts included)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    p = next(module.parameters(), None)
    return default if p is None else p.dtype


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when the tokenizer has it as one special or added token (``<|im_end|>``), else
    ``None``. An ordinary vocabulary entry ("Paris") is not one: the same text also comes as other tokens
    ("ĠParis"), so it must be matched as text."""
    special = set(getattr(tokenizer, "all_special_tokens", [])) | set(
        getattr(tokenizer, "get_added_vocab", dict)()
    )
    if text not in special:
        return None
    token = tokenizer.convert_tokens_to_ids(text)
    if token is None or (token == tokenizer.unk_token_id and text != tokenizer.unk_token):
        return None
    return int(token)


class CambrianModel(nn.Module):
    """Vision towers, a connector and an LLM composed into one multimodal causal LM.

    Args:
        vision_tower_aux_list: encoder configs, one per tower (``type`` + keywords).
        llm: LLM config.
        connector: connector config; ``in_channels``, ``in_token_lens``, ``out_dim`` and ``token_len`` are
            filled in from the towers and the LLM.
        mm_projector_type: shortcut for ``connector=dict(type=mm_projector_type)``.
        vision_tower_aux_token_len_list: token count per tower (perfect squares); overrides each tower's.
        image_token_len: image grid handed to the LLM (``f*f``; each image takes at most ``f*(f+1)`` tokens).
        unpad: drop grid rows/columns that are pure expand-to-square padding (training and inference alike).
        tower_cambrian1_compat: the towers preprocess and resize as Cambrian-1 did (plain bilinear shrinking,
            its pad colours), for its released connectors; the LLM template has its own ``cambrian1_compat``.
        stage: ``pretrain`` | ``finetune`` | ``full`` (see ``set_stage``).
        gradient_checkpointing: recompute LLM layers and in-LLM samplers in backward.
    """

    config_components = {"vision_tower_aux_list": "encoders", "connector": "connectors", "llm": "llms"}
    config_supplied = {"connector": ("in_channels", "in_token_lens", "out_dim", "token_len")}

    def __init__(
        self,
        vision_tower_aux_list: Sequence[Mapping[str, Any]],
        llm: Mapping[str, Any],
        connector: Mapping[str, Any] | None = None,
        mm_projector_type: str | None = None,
        vision_tower_aux_token_len_list: Sequence[int] | None = None,
        image_token_len: int = 576,
        unpad: bool = True,
        tower_cambrian1_compat: bool = False,
        stage: str = "finetune",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        kwargs = {
            "vision_tower_aux_list": _plain(vision_tower_aux_list),
            "llm": _plain(llm),
            "connector": _plain(connector),
            "mm_projector_type": mm_projector_type,
            "vision_tower_aux_token_len_list": _plain(vision_tower_aux_token_len_list),
            "image_token_len": image_token_len,
            "unpad": unpad,
            "tower_cambrian1_compat": bool(tower_cambrian1_compat),
            "stage": stage,
            "gradient_checkpointing": gradient_checkpointing,
        }
        problems = self.check_config(kwargs)
        if problems:
            from cambrian_core.config import ConfigError, Problem

            raise ConfigError([Problem("model", p) for p in problems])
        #: the config this model was built from (plain python), used by ``save_pretrained``
        self.model_config = kwargs
        lens = kwargs["vision_tower_aux_token_len_list"]
        tower_cfgs = [
            {**t, "token_len": lens[i]} if lens is not None else t
            for i, t in enumerate(kwargs["vision_tower_aux_list"])
        ]
        self.towers = nn.ModuleList(build(ENCODERS, cfg) for cfg in tower_cfgs)
        for tower in self.towers:
            tower.set_cambrian1_compat(kwargs["tower_cambrian1_compat"])
        self._tower_freeze = [t.frozen for t in self.towers]
        self.llm: LanguageModel = build(LLMS, kwargs["llm"])
        hidden = self.llm.hidden_size
        self.connector: Connector = build(
            CONNECTORS,
            connector_config(kwargs),
            in_channels=[t.hidden_size for t in self.towers],
            in_token_lens=[t.token_len for t in self.towers],
            out_dim=hidden,
            token_len=image_token_len,
        )
        embed_dtype = self.llm.model.get_input_embeddings().weight.dtype
        self.image_newline = nn.Parameter(torch.randn(hidden, dtype=embed_dtype) / math.sqrt(hidden))
        self.image_token_len = image_token_len
        self.unpad = unpad
        layers = self.llm.decoder_layers
        scheduled = tuple(self.connector.sampler_layers)
        if scheduled and max(scheduled) >= len(layers):
            raise ValueError(
                f"connector {type(self.connector).__name__} schedules in-LLM samplers after decoder layers "
                f"{list(scheduled)} but the LLM has {len(layers)} layers (0..{len(layers) - 1}); lower "
                "start_of_vision_sampler_layers / stride_of_vision_sampler_layers / num_of_vision_sampler_layers"
            )
        install_hooks(nn.ModuleList(layers[i] for i in scheduled))
        self.gradient_checkpointing = False
        self.stage = stage
        self.set_stage(stage, log_table=False)  # trainers call set_stage again and log the table
        if gradient_checkpointing:
            self.gradient_checkpointing_enable()

    # ------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, kwargs: Mapping[str, Any]) -> list[str]:
        """Cross-field problems of a model config, found before anything is built (see ``checks``)."""
        return check_model_config(kwargs)

    @property
    def grid(self) -> int:
        """Side ``f`` of the image grid."""
        return math.isqrt(self.image_token_len)

    @property
    def tokenizer(self) -> Any:
        """The LLM's tokenizer."""
        return self.llm.tokenizer

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: str, log_table: bool = True) -> str:
        """Freeze / unfreeze by stage and return (and log) the table of trainable parameters per module.

        ``pretrain``: connector + newline; ``finetune``: + LLM (+ towers built with ``freeze=False``);
        ``full``: everything.
        """
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r} is unknown; stages: {', '.join(STAGES)}")
        self.stage = stage
        for tower, frozen in zip(self.towers, self._tower_freeze, strict=True):
            tower.set_frozen(not (stage == "full" or (stage == "finetune" and not frozen)))
        self.llm.requires_grad_(stage != "pretrain")
        self.connector.requires_grad_(True)
        self.image_newline.requires_grad_(True)
        table = parameter_table(self.named_parameters())
        if log_table:
            log.info("stage %s trains %s:\n%s", stage, STAGES[stage], table)
        return table

    def param_groups(self, trainable_only: bool = True) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by module prefix (``towers.<i>``, ``connector.<child>``, ``connector``, ``image_newline``,
        ``llm``) so a trainer can give each its own learning rate."""
        out: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad or not trainable_only:
                out.setdefault(group_of(name), []).append((name, p))
        return out

    def gradient_checkpointing_enable(self) -> None:
        """Recompute LLM decoder layers and in-LLM samplers in backward instead of storing activations."""
        hf = self.llm.model
        kwargs = {"use_reentrant": False, "context_fn": recompute_context}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.gradient_checkpointing = True

    def compile_connector(self, **compile_kwargs: Any) -> None:
        """Run the connector (and its in-LLM samplers) through ``torch.compile``, in place: parameter names and
        the saved state dict do not change. The first batch of each new shape pays the compilation (tens of
        seconds); ``benchmarks/bench_sva.py`` measures what it gains (eager vs compiled, same run)."""
        self.connector.compile(**compile_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Store activations again."""
        hf = self.llm.model
        if hasattr(hf, "activation_checkpointing_disable"):
            hf.activation_checkpointing_disable()
        else:
            hf.gradient_checkpointing_disable()
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ images
    def prepare_images(
        self, images: Sequence[Image.Image]
    ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """PIL images -> (one ``[N, 3, S_t, S_t]`` tensor per tower, ``[N, 2]`` (width, height) sizes)."""
        if not images:
            return None, None
        from cambrian_core.data.medimage import to_rgb

        rgb = [to_rgb(im) for im in images]  # 16-bit greyscale rescaled, not clipped white
        pixels = [torch.stack([tower.preprocess(im) for im in rgb]) for tower in self.towers]
        sizes = torch.tensor([im.size for im in rgb], dtype=torch.long)
        return pixels, sizes

    def encode_images(
        self,
        pixel_values: Sequence[torch.Tensor] | None = None,
        tower_features: Sequence[torch.Tensor | StagedTokens] | None = None,
        staged: bool = False,
    ) -> list[torch.Tensor | StagedTokens] | None:
        """Each tower's tokens ``[N_img, N_t, C_t]`` (from pixels, or checked precomputed features);
        ``staged=True``: multi-stage towers return :class:`StagedTokens` (``forward_staged``), and precomputed
        ``StagedTokens`` are passed on as they are (else turned into their tokens)."""
        if pixel_values is not None and tower_features is not None:
            raise ValueError("pass pixel_values or tower_features (precomputed tower outputs), not both")
        given = pixel_values if pixel_values is not None else tower_features
        if given is None:
            return None
        what = "pixel_values" if pixel_values is not None else "tower_features"
        if len(given) != len(self.towers):
            raise ValueError(f"{what} has {len(given)} entries but the model has {len(self.towers)} towers")
        counts = {int(x.shape[0]) for x in given}
        if len(counts) != 1:
            raise ValueError(f"{what} entries hold different image counts {[int(x.shape[0]) for x in given]}")
        if pixel_values is not None:
            run = [tower.forward_staged if staged else tower for tower in self.towers]
            return [fn(px) for fn, px in zip(run, pixel_values, strict=True)]
        for i, (tower, feats) in enumerate(zip(self.towers, tower_features, strict=True)):
            want = (tower.token_len, tower.hidden_size)
            if len(feats.shape) != 3 or tuple(feats.shape[1:]) != want:
                raise ValueError(
                    f"tower_features[{i}] has shape {tuple(feats.shape)}; tower {i} ({type(tower).__name__}) "
                    f"gives [N_img, {want[0]}, {want[1]}] (stale feature cache?)"
                )
        return [f.tokens() if isinstance(f, StagedTokens) and not staged else f for f in tower_features]

    # ------------------------------------------------------------------ sequences
    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: Sequence[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
        tower_features: Sequence[torch.Tensor | StagedTokens] | None = None,
        position_ids: torch.Tensor | None = None,
        padding_side: Literal["right", "left"] = "right",
    ) -> tuple[SplicedBatch, SamplerContext | None]:
        """Encode the images, splice their blocks into the sequences and build the samplers' context."""
        feats = self.encode_images(pixel_values, tower_features, staged=self.connector.accepts_staged)
        n = 0 if feats is None else int(feats[0].shape[0])
        pad_id = int(self.llm.tokenizer.pad_token_id)
        text = self.llm.embed_tokens(input_ids.masked_fill(input_ids < 0, pad_id))
        if n == 0:
            batch = splice(input_ids, text, attention_mask, labels, position_ids, None, padding_side)
            return batch, None
        if image_sizes is not None and len(image_sizes) != n:
            raise ValueError(f"image_sizes has {len(image_sizes)} rows but the batch has {n} images")
        masks = None
        if image_sizes is not None and self.connector.uses_masks:
            masks = []
            for tower in self.towers:
                ext = real_extents(image_sizes, tower.grid).to(text.device)
                masks.append(grid_masks(ext, tower.grid))
        cdtype = _dtype_of(self.connector, text.dtype)
        out = self.connector([f.to(device=text.device, dtype=cdtype) for f in feats], masks)
        f = self.grid
        samplers = bool(self.connector.sampler_layers)
        extents = real_extents(image_sizes, f, n).to(text.device)
        kept = extents if self.unpad else real_extents(None, f, n).to(text.device)
        blocks = build_image_blocks(out.tokens.to(text.dtype), self.image_newline, kept, with_cells=samplers)
        batch = splice(input_ids, text, attention_mask, labels, position_ids, blocks, padding_side)
        ctx = None
        if samplers:
            layers = self.llm.decoder_layers
            grid_cell = blocks.cells >= 0
            ctx = SamplerContext(
                connector=self.connector,
                schedule={layers[i]: k for k, i in enumerate(self.connector.sampler_layers)},
                state=out.state,
                grid_mask=None if image_sizes is None else grid_masks(extents, f),
                seq_batch=batch.image_batch[grid_cell],
                seq_pos=batch.image_pos[grid_cell],
                grid_index=blocks.cells[grid_cell],
                n_images=n,
                cells=f * f,
                seq_len=int(batch.inputs_embeds.shape[1]),
                dtype=cdtype,
                checkpoint=self.gradient_checkpointing and self.training,
                batch_size=int(batch.inputs_embeds.shape[0]),
            )
        return batch, ctx

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: Sequence[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
        tower_features: Sequence[torch.Tensor | StagedTokens] | None = None,
        position_ids: torch.Tensor | None = None,
        padding_side: Literal["right", "left"] = "right",
        loss_only: bool = False,
        **llm_kwargs: Any,
    ) -> Any:
        """Causal-LM forward over text with spliced images; returns transformers' ``CausalLMOutputWithPast``.

        Args:
            input_ids: ``[B, L]`` with one ``IMAGE_TOKEN_INDEX`` per image.
            attention_mask: ``[B, L]`` (0 = padding, dropped before re-padding).
            labels: ``[B, L]`` targets (``IGNORE_INDEX`` where no loss); image blocks never carry loss.
            pixel_values: one ``[N_img, 3, S_t, S_t]`` tensor per tower, images in sample order.
            image_sizes: ``[N_img, 2]`` original (width, height) per image; ``None`` = square images.
            tower_features: precomputed tower outputs ``[N_img, N_t, C_t]`` (or ``StagedTokens``) instead of
                ``pixel_values``.
            position_ids: ``[B, L]``; a 0 starts a new packed segment.
            padding_side: side of the padding of the expanded sequences (logits follow that layout).
            loss_only: with ``labels``, compute logits only at target positions and return the loss with
                ``logits=None`` (what training needs; the LM head skips image, prompt and padding rows).
        """
        batch, ctx = self.prepare_inputs(
            input_ids,
            attention_mask,
            labels,
            pixel_values,
            image_sizes,
            tower_features,
            position_ids,
            padding_side,
        )
        if self.training:
            llm_kwargs.setdefault("use_cache", False)  # a training forward never decodes further
        mask = batch.attention_mask
        if position_ids is not None and padding_side == "right" and not llm_kwargs.get("use_cache"):
            varlen = getattr(self.llm.model.config, "_attn_implementation", None) == VARLEN_ATTENTION
            if varlen and batch.inputs_embeds.device.type != "xla":  # XLA wants static shapes: the mask
                # packed rows, attention per segment: segment bounds instead of a mask (none is built)
                bounds = segment_bounds(batch.position_ids, mask)
                longest = int((bounds[1:] - bounds[:-1]).max())
                llm_kwargs.update(
                    cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest
                )
                mask = torch.ones_like(mask)
            else:
                # transformers keeps the segments apart (a 0 in position_ids starts one) only when it gets no
                # 2-D mask. Right padding follows every real token of a causal row, so nothing real sees it.
                mask = None
        with activate(ctx):
            if loss_only and batch.labels is not None:
                loss = self.llm.target_loss(
                    batch.labels,
                    inputs_embeds=batch.inputs_embeds,
                    attention_mask=mask,
                    position_ids=batch.position_ids,
                    **llm_kwargs,
                )
                if loss is not None:
                    return CausalLMOutputWithPast(loss=loss)
            return self.llm(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=mask,
                position_ids=batch.position_ids,
                labels=batch.labels,
                **llm_kwargs,
            )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: Sequence[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
        tower_features: Sequence[torch.Tensor | StagedTokens] | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] | None = None,
        eos_token_id: int | list[int] | None = None,
        streamer: Any = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate with the LLM's KV cache; returns the new token ids ``[B, T]`` (padded with the pad id).

        The prompt (images spliced, left-padded) is the prefill of transformers' ``generate``; the in-LLM
        samplers act on that pass only. The model's train/eval mode is left as it is (a model from
        ``load_model`` is in eval mode); nothing about the call is stored on the model.
        """
        batch, ctx = self.prepare_inputs(
            input_ids, attention_mask, None, pixel_values, image_sizes, tower_features, None, "left"
        )
        tok = self.llm.tokenizer
        if (
            eos_token_id is None
        ):  # the tokenizer's EOS and the model's own end tokens (Llama-3: <|eot_id|> too)
            gen = getattr(getattr(self.llm.model, "generation_config", None), "eos_token_id", None)
            eos = [tok.eos_token_id, *(gen if isinstance(gen, (list, tuple)) else [gen])]
            eos = [int(t) for t in dict.fromkeys(eos) if t is not None]
        else:
            eos = eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        texts = []
        for stop in stop_strings or ():
            token = _single_token(tok, stop)
            if token is None:
                texts.append(stop)
            elif token not in eos_ids:
                eos_ids.append(token)  # a stop string that is one token stops as cheaply as EOS
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": eos_ids or None,
        }
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        if texts:
            kwargs.update(stop_strings=texts, tokenizer=tok)
        kwargs.update(generate_kwargs)
        with activate(ctx):
            return self.llm.model.generate(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                streamer=streamer,
                **kwargs,
            )

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: Sequence[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> Prefill:
        """The prompt pass of step-wise decoding (a serving engine's own loop): images spliced, left-padded,
        through the LLM with a KV cache; the in-LLM samplers act here, as in ``generate``. Logits are computed
        for the last position only."""
        batch, ctx = self.prepare_inputs(
            input_ids, attention_mask, None, pixel_values, image_sizes, None, None, "left"
        )
        with activate(ctx):
            out = self.llm.model(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=True,
                logits_to_keep=1,
            )
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        mask = batch.attention_mask
        return Prefill(out.logits[:, -1].float(), cache, mask, mask.sum(1))

    @torch.no_grad()
    def decode_step(
        self, tokens: torch.Tensor, cache: Any, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One decoding step: ``tokens`` ``[B]`` at ``positions`` ``[B]`` against ``cache`` (updated in place);
        ``attention_mask`` ``[B, cached + 1]`` covers the cache and the new token. Returns logits ``[B, V]``."""
        out = self.llm.model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{self.llm.cache_keyword: cache},
        )
        return out.logits[:, -1].float()

    def chat(
        self,
        messages: str | Sequence[Message | Mapping[str, Any]],
        images: Sequence[Image.Image] | None = None,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 0.2,
        top_p: float = 1.0,
        streamer: Any = None,
    ) -> str:
        """Answer a prompt (or a conversation ending with a user turn) about ``images``.

        A plain string prompt without ``<image>`` markers gets one marker per image in front of it.
        """
        images = list(images or [])
        if isinstance(messages, str):
            text = messages
            if images and IMAGE_TOKEN not in text:
                text = "\n".join([IMAGE_TOKEN] * len(images) + [text])
            messages = [Message("user", text)]
        tok, template = self.llm.tokenizer, self.llm.template
        conv = tokenize_conversation(
            tok, template, to_messages(messages), add_generation_prompt=True, num_images=len(images)
        )
        device = self.image_newline.device
        ids = torch.tensor([conv.input_ids], dtype=torch.long, device=device)
        pixels, sizes = self.prepare_images(images)
        out = self.generate(
            ids,
            torch.ones_like(ids),
            pixel_values=pixels,
            image_sizes=sizes,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            stop_strings=template.stop_strings,
            streamer=streamer,
        )
        answer = tok.decode(out[0], skip_special_tokens=True)
        for stop in template.stop_strings:
            if stop and stop in answer:
                answer = answer[: answer.index(stop)]
        return answer.strip()

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, folder: str, max_shard_size: int | str = "2GB") -> str:
        """Write config, LLM files and sharded safetensors to ``folder`` atomically (see ``io.save_model``)."""
        from cambrian_core.model.io import save_model

        return save_model(self, folder, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path_or_name: str, **kwargs: Any) -> CambrianModel:
        """``io.load_model``: a saved folder or a registered checkpoint name."""
        from cambrian_core.model.io import load_model

        return load_model(path_or_name, **kwargs)


def register(registries: Any) -> None:
    """Core plugin hook: the composed model is the ``cambrian`` entry of ``MODELS``."""
    registries.models.register_module(name="cambrian", module=CambrianModel)
