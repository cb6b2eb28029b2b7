"""Small, fully known parts for the composed-model tests: a patchify tower, a connector with in-LLM samplers
and a tiny LLaMA LLM with a word-level tokenizer. They are registered under ``test_*`` names by ``register()``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cambrian_core import CONNECTORS, ENCODERS, LLMS, plugins
from cambrian_core.model.connector import Connector, ConnectorOutput
from cambrian_core.model.encoder import IMAGENET_MEAN, IMAGENET_STD, VisionEncoder, interpolate_tokens
from cambrian_core.model.llm import LanguageModel
from cambrian_core.model.template import ChatTemplate, Message, Segment

WORDS = [
    "what",
    "is",
    "in",
    "the",
    "image",
    "?",
    "a",
    "chest",
    "x-ray",
    "lung",
    "heart",
    "normal",
    "no",
    "yes",
    "left",
    "right",
    "USER",
    ":",
    "ASSISTANT",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


class PatchTower(VisionEncoder):
    """Patchify conv; ``weights`` (a torch file) is a weight source that a saved model must not need."""

    def __init__(
        self,
        width: int = 24,
        patch: int = 8,
        image_size: int = 32,
        weights: str | None = None,
        token_len: int | None = None,
        freeze: bool = True,
        dtype: str = "float32",
    ) -> None:
        super().__init__(token_len=token_len, freeze=freeze, dtype=dtype)
        self.hidden_size, self.image_size, self.native_grid = width, image_size, image_size // patch
        self.image_mean, self.image_std = IMAGENET_MEAN, IMAGENET_STD
        self.patch = patch
        self.proj = nn.Conv2d(3, width, patch, patch)
        self.norm = nn.LayerNorm(width)
        if weights is not None:
            self.load_state_dict(torch.load(weights, weights_only=True))
        self.to(getattr(torch, dtype))
        self.set_frozen(freeze)
        self._freeze_cfg = freeze

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pixels).flatten(2).transpose(1, 2))

    @classmethod
    def config_dims(cls, kwargs: dict[str, Any]) -> dict[str, int | None]:
        side = kwargs.get("image_size", 32) // kwargs.get("patch", 8)
        return {"hidden_size": kwargs.get("width", 24), "token_len": kwargs.get("token_len") or side * side}

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {}

    def architecture_config(self) -> dict[str, Any]:
        return {
            "width": self.hidden_size,
            "patch": self.patch,
            "image_size": self.image_size,
            "token_len": self.token_len,
            "freeze": self._freeze_cfg,
            "dtype": self.dtype_name,
        }


class GridConnector(Connector):
    """Per-tower linear -> resize to the grid -> sum -> MLP; sampler ``k`` adds ``Linear([h, ctx])`` on real cells.

    ``in_token_lens`` sides must be multiples of the grid side (as SVA windows require).
    """

    def __init__(
        self,
        in_channels: list[int],
        in_token_lens: list[int],
        out_dim: int,
        token_len: int,
        width: int = 16,
        num_samplers: int = 0,
        start: int = 0,
        stride: int = 1,
    ) -> None:
        super().__init__(in_channels, in_token_lens, out_dim, token_len)
        self.proj = nn.ModuleList(nn.Linear(c, width) for c in in_channels)
        self.projector = nn.Sequential(nn.Linear(width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.samplers = nn.ModuleList(nn.Linear(out_dim + width, out_dim) for _ in range(num_samplers))
        self.query = nn.Parameter(torch.zeros(width))
        self.sampler_layers = tuple(start + k * stride for k in range(num_samplers))

    @classmethod
    def check_config(cls, kwargs: dict[str, Any]) -> list[str]:
        lens, tlen = kwargs.get("in_token_lens"), kwargs.get("token_len")
        if lens is None or tlen is None:
            return []
        f = round(tlen**0.5)
        return [
            f"tower {i}: grid side {round(n**0.5)} is not a multiple of the output grid side {f}"
            for i, n in enumerate(lens)
            if round(n**0.5) % f
        ]

    def forward(
        self, features: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None
    ) -> ConnectorOutput:
        grids = []
        for i, (proj, feats) in enumerate(zip(self.proj, features, strict=True)):
            x = proj(feats)
            if masks is not None and masks[i] is not None:
                x = x * masks[i][..., None].to(x.dtype)
            grids.append(interpolate_tokens(x, self.token_len))
        ctx = torch.stack(grids).sum(0) + self.query
        return ConnectorOutput(self.projector(ctx), state=ctx)

    def llm_sample(
        self, index: int, hidden: torch.Tensor, state: Any, grid_mask: torch.Tensor | None
    ) -> torch.Tensor:
        update = self.samplers[index](torch.cat([hidden, state.to(hidden.dtype)], -1))
        if grid_mask is not None:
            update = update * grid_mask[..., None].to(update.dtype)
        return hidden + update


class WordTemplate(ChatTemplate):
    name = "test_words"

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> list[Segment]:
        out = []
        for m in messages:
            if m.role == "user":
                out.append(Segment(f"USER : {m.content} ASSISTANT :"))
            elif m.role == "assistant":
                out += [Segment(f" {m.content}", train=True), Segment(" </s>", train=True)]
        return out

    @property
    def stop_strings(self) -> list[str]:
        return ["</s>"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*SPECIALS, "<image>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class TinyLlama(LanguageModel):
    """A randomly initialised LLaMA; ``path`` (written by ``save_pretrained``) rebuilds it without weights."""

    def __init__(
        self, hidden_size: int = 32, num_layers: int = 4, tie: bool = True, path: str | None = None
    ) -> None:
        if path is not None:
            config = LlamaConfig.from_pretrained(path)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tokenizer = word_tokenizer()
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                tie_word_embeddings=tie,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        config._attn_implementation = "sdpa"
        super().__init__(LlamaForCausalLM(config), tokenizer, WordTemplate())

    @classmethod
    def config_hidden_size(cls, kwargs: dict[str, Any]) -> int | None:
        return None if kwargs.get("path") else kwargs.get("hidden_size", 32)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {}

    def save_pretrained(self, folder: str) -> dict[str, Any]:
        os.makedirs(folder, exist_ok=True)
        self.model.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return {"path": folder}


def register() -> None:
    """Register the parts (again, if discovery was re-run) under ``test_*`` names."""
    plugins.ensure_loaded()
    ENCODERS.register_module(name="test_patch", module=PatchTower, force=True)
    CONNECTORS.register_module(name="test_grid", module=GridConnector, force=True)
    LLMS.register_module(name="test_llama", module=TinyLlama, force=True)


def model_config(**overrides: Any) -> dict[str, Any]:
    """Two towers (16 and 64 tokens), grid 4x4, samplers after layers 0 and 2 of a 4-layer LLM."""
    cfg = {
        "type": "cambrian",
        "vision_tower_aux_list": [
            {"type": "test_patch", "width": 24, "patch": 8},
            {"type": "test_patch", "width": 20, "patch": 4},
        ],
        "image_token_len": 16,
        "connector": {"type": "test_grid", "num_samplers": 2, "start": 0, "stride": 2},
        "llm": {"type": "test_llama", "hidden_size": 32, "num_layers": 4},
    }
    cfg.update(overrides)
    return cfg
