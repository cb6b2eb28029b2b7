"""The LLM contract: an HF causal LM with its tokenizer and chat template, as the composed model needs it."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cambrian_core.model.template import ChatTemplate
from cambrian_core.model.tokenize import IGNORE_INDEX

__all__ = ["LanguageModel"]


class LanguageModel(nn.Module):
    """Wraps a transformers causal LM (``self.model``), its tokenizer and its chat template.

    Plugins build one of these (from a local HF folder, a GGUF file or a tiny config) and the composed model
    uses only what is below: the hidden size, the decoder layers (for in-LLM samplers and FSDP wrapping),
    the token embedding, and the causal LM forward on ``inputs_embeds``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, template: ChatTemplate) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                f"{type(self).__name__}: the tokenizer has no pad token; set one in the LLM plugin"
            )

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Keywords that build a tiny randomly initialised instance offline (registry-driven tests use it)."""
        raise TypeError(f"{cls.__name__} must define the classmethod tiny_config() for the registry tests")

    @classmethod
    def config_hidden_size(cls, kwargs: dict[str, Any]) -> int | None:
        """Hidden size the LLM ``kwargs`` would build, when known without building it (``None`` = unknown).
        The composed model's config check compares it with the connector before any weights load."""
        return None

    def save_pretrained(self, folder: str) -> dict[str, Any]:
        """Write what rebuilding needs besides the weights (HF ``config.json``, tokenizer files) to ``folder``
        and return keywords (without ``type``) that rebuild this LLM from that folder with no weights loaded."""
        raise TypeError(
            f"{type(self).__name__} must define save_pretrained(folder) so saved models can restore it"
        )

    @property
    def hidden_size(self) -> int:
        """Width of the LLM's hidden states."""
        return int(self.model.config.hidden_size)

    @property
    def cache_keyword(self) -> str:
        """Name under which the causal LM's forward takes a KV cache: ``cache`` (transformers >= 5.2x) or
        ``past_key_values`` (earlier releases, which silently drop an unknown ``cache=`` keyword)."""
        model = self.model
        if callable(getattr(model, "get_base_model", None)):  # a PEFT wrapper
            model = model.get_base_model()
        return _cache_keyword(type(model))

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return self.model.get_decoder().layers

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, L, hidden_size]``."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, **kwargs: Any) -> Any:
        """The HF causal-LM forward (``inputs_embeds``, ``attention_mask``, ``position_ids``, ``labels`` ...)."""
        return self.model(**kwargs)

    def target_loss(self, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor | None:
        """Next-token cross-entropy (mean over targets, as HF's loss) with logits only where a target is.

        The LM head (often the largest matmul of a small LLM: ``hidden x vocab`` per token) runs on the
        target positions alone instead of every image, prompt and padding position. ``kwargs`` go to the
        decoder stack. Returns ``None`` when this LLM's head is not a plain projection of the last hidden
        state (logit soft-capping, logit scaling, router losses); the caller then runs the full forward.
        """
        hf = self.model
        config = getattr(hf, "config", None)
        decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
        head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        if (
            decoder is None
            or decoder is hf
            or not isinstance(head, nn.Linear)
            or any(getattr(config, k, None) for k in ("final_logit_softcapping", "output_router_logits"))
            or getattr(config, "logit_scale", None) not in (None, 1, 1.0)
        ):
            return None
        out = decoder(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != IGNORE_INDEX
        logits = head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])


@functools.cache
def _cache_keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    # a wrapper taking **kwargs only (PEFT, say): the installed transformers' own convention
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
