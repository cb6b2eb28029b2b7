"""``hf_causal_lm``: any Hugging Face causal LM from a local folder, and the base of every LLM family here.

An LLM is built either from ``path=`` (a local HF folder: ``config.json``, tokenizer files and, unless
``load_weights=False``, the weights, loaded with ``from_pretrained``) or from ``config=`` (an inline HF config
dict: a randomly initialised model with the family's small in-memory tokenizer, for offline tests). Nothing
is downloaded: a hub id is refused with instructions.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cambrian_core.model.attention import VARLEN_ATTENTION
from cambrian_core.model.llm import LanguageModel
from cambrian_core.model.template import ChatTemplate, Message
from cambrian_core.model.tokenize import TokenizedConversation, tokenize_conversation
from cambrian_core.registry import TEMPLATES, accepted_kwargs, build

from ._tiny_tokenizer import tiny_tokenizer

__all__ = [
    "DTYPES",
    "TINY_LLAMA",
    "HFCausalLM",
    "build_template",
    "enable_gradient_checkpointing",
    "register",
]

#: accepted ``dtype`` names
DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

#: a LLaMA-architecture HF config small enough for CPU tests
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def build_template(
    spec: str | Mapping[str, Any] | ChatTemplate, tokenizer: Any, system: str | None, cambrian1_compat: bool
) -> ChatTemplate:
    """Build a chat template from a name or config dict, handing it the tokenizer when it takes one."""
    if isinstance(spec, ChatTemplate):
        return spec
    cfg = {"type": spec} if isinstance(spec, str) else dict(spec)
    target = TEMPLATES.lookup(cfg.get("type"))
    names, _ = accepted_kwargs(target)
    if system is not None:
        cfg.setdefault("system", system)
    if cambrian1_compat:
        if "cambrian1_compat" not in names:
            raise ValueError(f"template `{cfg['type']}` has no cambrian1_compat mode")
        cfg.setdefault("cambrian1_compat", True)
    if "tokenizer" in names:
        cfg.setdefault("tokenizer", tokenizer)
    return build(TEMPLATES, cfg)


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute decoder activations in backward (non-reentrant), whatever the transformers version calls it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class HFCausalLM(LanguageModel):
    """A Hugging Face causal LM with its tokenizer, pad token and chat template.

    Args:
        path: local HF folder (``config.json`` + tokenizer + weights).
        config: inline HF config dict for a randomly initialised model with the family's tiny tokenizer
            (``model_type`` defaults to ``llama``; ``vocab_size`` to the tokenizer's size).
        template: chat template name (``llama_3``, ``vicuna_v1``, ``chatml_direct``, ``plain``, ``hf_chat``)
            or config dict; ``None`` takes the family default.
        system: system prompt (``None``: the template's default).
        cambrian1_compat: render prompts as Cambrian-1 did (for its released checkpoints).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own).
        attn_implementation: ``sdpa`` (default; packed training batches attend per sample, see
            :mod:`cambrian_core.model.attention`), ``eager`` or ``flash_attention_2`` (needs flash-attn).
        gradient_checkpointing: recompute decoder activations in backward to save memory.
        load_weights: with ``path``, load the weights (``False``: random init from the folder's config; the
            composed model then loads its own saved state dict).
    """

    #: chat template used when ``template`` is not given
    default_template: str | None = "hf_chat"
    #: ``path`` may be omitted (the family knows where its weights are)
    has_default_path: bool = False
    config_components = {"template": "templates"}

    def __init__(
        self,
        path: str | None = None,
        config: Mapping[str, Any] | None = None,
        template: str | Mapping[str, Any] | None = None,
        system: str | None = None,
        cambrian1_compat: bool = False,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        load_weights: bool = True,
    ) -> None:
        if path is None and config is None and self.has_default_path:
            path = str(self.default_path())
        kwargs = dict(
            path=path,
            config=config,
            template=template,
            system=system,
            cambrian1_compat=cambrian1_compat,
            dtype=dtype,
            attn_implementation=attn_implementation,
        )
        problems = self.check_config(kwargs)
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        if path is not None:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:
            tokenizer = self.tiny_tokenizer()
        self.setup_pad_token(tokenizer)
        hf_config = self._hf_config(path, config, tokenizer)
        torch_dtype = DTYPES[dtype]
        if path is not None and load_weights:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                config=hf_config,
                dtype=torch_dtype,
                attn_implementation=attn_implementation,
                local_files_only=True,
            )
        else:
            if torch_dtype == "auto":
                torch_dtype = getattr(hf_config, "dtype", None) or torch.float32
            model = AutoModelForCausalLM.from_config(
                hf_config, dtype=torch_dtype, attn_implementation=attn_implementation
            )
        if getattr(model.config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(VARLEN_ATTENTION)  # sdpa that runs packed segments apart
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        spec = template if template is not None else self.default_template
        if spec is None:
            raise ValueError(f"{type(self).__name__}: choose a chat template with `template=`")
        chat = build_template(spec, tokenizer, system, cambrian1_compat)
        split = chat.token_problems(tokenizer)
        if split:
            raise ValueError(
                f"{type(self).__name__}: chat template {chat.name!r} needs its markers as single tokens, but this "
                f"tokenizer splits them ({'; '.join(split)}): it was trained with another format. Use the LLM's own "
                "template (`template='hf_chat'` renders the tokenizer's chat_template)"
            )
        super().__init__(model, tokenizer, chat)
        self._rebuild = dict(
            template=spec if isinstance(spec, (str, Mapping)) else spec.name,
            system=system,
            cambrian1_compat=cambrian1_compat,
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
        )

    # ------------------------------------------------------------------------------------ family hooks
    @classmethod
    def tiny_tokenizer(cls) -> Any:
        """The family's in-memory tokenizer for ``config=`` builds (generic: ChatML tokens, EOS only)."""
        return tiny_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|endoftext|>")

    @classmethod
    def setup_pad_token(cls, tokenizer: Any) -> None:
        """Give ``tokenizer`` a pad token when it has none (generic: unk, else eos)."""
        if tokenizer.pad_token is None:
            fallback = tokenizer.unk_token or tokenizer.eos_token
            if fallback is None:
                raise ValueError("the tokenizer has no pad, unk or eos token to pad with")
            tokenizer.pad_token = fallback

    @classmethod
    def default_path(cls) -> Path:
        """Where the family's weights live when ``path`` is omitted (only with ``has_default_path``)."""
        raise TypeError(
            f"{cls.__name__} needs `path=` (a local HF folder) or `config=` (an inline HF config)"
        )

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"config": dict(TINY_LLAMA), "template": "chatml_direct"}

    # ------------------------------------------------------------------------------------ checks
    @classmethod
    def check_config(cls, kwargs: Mapping[str, Any]) -> list[str]:
        """Cross-field checks that need no weights: source, dtype, attention, template."""
        out = []
        path, config = kwargs.get("path"), kwargs.get("config")
        if path is not None and config is not None:
            out.append("give either `path` (a local HF folder) or `config` (an inline HF config), not both")
        elif path is None and config is None and not cls.has_default_path:
            out.append("give `path` (a local HF folder) or `config` (an inline HF config dict)")
        if path is not None:
            folder = Path(str(path)).expanduser()
            if not folder.is_dir():
                out.append(
                    f"path {str(path)!r} is not a local folder; nothing is downloaded from a hub: download the "
                    "model first (e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and pass path=DIR"
                )
            elif not (folder / "config.json").is_file():
                out.append(f"path {str(path)!r} has no config.json; it is not a Hugging Face model folder")
        if config is not None and not isinstance(config, Mapping):
            out.append(f"`config` must be a dict of HF config keys, got {type(config).__name__}")
        dtype = kwargs.get("dtype", "float32")
        if dtype not in DTYPES:
            out.append(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        attn = kwargs.get("attn_implementation", "sdpa")
        if attn not in ATTN_IMPLEMENTATIONS:
            out.append(f"attn_implementation {attn!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        elif attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            out.append(
                "attn_implementation='flash_attention_2' needs the flash-attn package: "
                "`pip install cambrian[flash]` (CUDA only), or use attn_implementation='sdpa'"
            )
        template = kwargs.get("template") or cls.default_template
        name = template.get("type") if isinstance(template, Mapping) else template
        if isinstance(name, str):
            if name not in TEMPLATES:
                out.append(f"unknown chat template {name!r}; registered: {', '.join(TEMPLATES.names())}")
            elif (
                kwargs.get("cambrian1_compat")
                and "cambrian1_compat" not in accepted_kwargs(TEMPLATES.get(name))[0]
            ):
                out.append(f"template {name!r} has no cambrian1_compat mode")
        return out

    @classmethod
    def config_hidden_size(cls, kwargs: dict[str, Any]) -> int | None:
        return cls._config_field(kwargs, "hidden_size")

    @classmethod
    def config_num_layers(cls, kwargs: dict[str, Any]) -> int | None:
        """Decoder layers of the configured LLM (inline config or the folder's config.json), or ``None``."""
        return cls._config_field(kwargs, "num_hidden_layers")

    @classmethod
    def _config_field(cls, kwargs: dict[str, Any], key: str) -> int | None:
        config, path = kwargs.get("config"), kwargs.get("path")
        if isinstance(config, Mapping):
            return int(config[key]) if key in config else None
        if path is None and config is None and cls.has_default_path:
            try:
                path = cls.default_path_if_ready()
            except Exception:
                return None
        if path is not None:
            cfg_file = Path(str(path)).expanduser() / "config.json"
            if cfg_file.is_file():
                value = json.loads(cfg_file.read_text()).get(key)
                return int(value) if value is not None else None
        return None

    @classmethod
    def default_path_if_ready(cls) -> Path | None:
        """The default folder if it exists already (no conversion); ``None`` otherwise."""
        return None

    # ------------------------------------------------------------------------------------ building
    def _hf_config(self, path: str | None, config: Mapping[str, Any] | None, tokenizer: Any) -> Any:
        if path is not None:
            return AutoConfig.from_pretrained(path, local_files_only=True)
        cfg = dict(config or {})
        model_type = cfg.pop("model_type", "llama")
        vocab = len(tokenizer)
        cfg.setdefault("vocab_size", vocab)
        if cfg["vocab_size"] < vocab:
            raise ValueError(
                f"config vocab_size={cfg['vocab_size']} is smaller than the tokenizer's {vocab} tokens"
            )
        for key in ("pad", "bos", "eos"):
            token_id = getattr(tokenizer, f"{key}_token_id", None)
            if token_id is not None:
                cfg.setdefault(f"{key}_token_id", token_id)
        return AutoConfig.for_model(model_type, **cfg)

    # ------------------------------------------------------------------------------------ contract
    def save_pretrained(self, folder: str) -> dict[str, Any]:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(out)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return {"path": str(out), "load_weights": False, **self._rebuild}

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end generation: the template's single-token stop strings and EOS."""
        ids = []
        for s in self.template.stop_strings:
            enc = self.tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.append(int(enc[0]))
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            ids.append(int(eos))
        return list(dict.fromkeys(ids))

    def tokenize(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> TokenizedConversation:
        """``tokenize_conversation`` with this LLM's tokenizer and template."""
        return tokenize_conversation(self.tokenizer, self.template, messages, add_generation_prompt, **kwargs)


def register(registries: Any) -> None:
    registries.llms.register_module(name="hf_causal_lm", module=HFCausalLM)
