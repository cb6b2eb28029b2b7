"""``cambrian export hf``: a saved cambrian model -> a Hugging Face transformers folder.

``llava``: a plain ``LlavaForConditionalGeneration`` (one CLIP / SigLIP tower + ``mlp2x_gelu``; see
:mod:`cambrian_core.export.hf_llava`). ``remote``: any model, loaded with ``trust_remote_code=True`` (see
:mod:`cambrian_core.export.remote`). ``auto`` picks Llava when the model fits it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cambrian_core.export.card import find_sources, model_card, parameter_counts
from cambrian_core.export.dtype import saved_folder
from cambrian_core.fileio import staged_folder

__all__ = ["FORMATS", "export_hf"]

FORMATS = ("auto", "llava", "remote")

_REMOTE_USAGE = """Needs the `cambrian` package installed (the remote code runs it; nothing else is downloaded):

```python
from PIL import Image
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)
print(model.chat("Describe the image.", images=[Image.open(PATH)]))
```

`forward` / `generate` take cambrian's inputs (`input_ids` with one `-200` per image, one pixel tensor per tower
from `model.prepare_images(images)`). The folder is also a saved cambrian model: `load_model(FOLDER)`."""


def _llava_shaped(cfg: dict) -> bool:
    conn = cfg.get("connector") or {"type": cfg.get("mm_projector_type")}
    towers = cfg.get("vision_tower_aux_list") or []
    deep2 = conn.get("type") == "mlp2x_gelu" or (conn.get("type") == "mlp_gelu" and conn.get("depth", 2) == 2)
    return len(towers) == 1 and towers[0].get("type") in ("clip", "siglip_hf") and deep2


def export_hf(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fmt: str = "auto",
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Export the saved model ``src`` (folder or registered name) to ``out``; returns ``out``.

    Raises:
        ValueError: ``fmt="llava"`` for a model Llava cannot represent (the reasons are listed).
    """
    from cambrian_core.export.dtype import resolve_dtype
    from cambrian_core.export.hf_llava import llava_problems, llava_usage, write_llava
    from cambrian_core.export.remote import write_remote_folder
    from cambrian_core.model.io import load_model

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    folder, meta = saved_folder(src)
    cfg = meta["model"]
    model = None
    if fmt == "llava" or (fmt == "auto" and _llava_shaped(cfg)):
        model = load_model(folder, dtype=resolve_dtype(dtype)[0] if dtype is not None else None)
        problems = llava_problems(model)
        if problems and fmt == "llava":
            raise ValueError(
                "not exportable as a plain Llava model: " + "; ".join(problems) + " (use --format remote)"
            )
        if problems:
            model = None
    title = Path(out).name
    llm_cfg = (
        json.loads((folder / "llm" / "config.json").read_text())
        if (folder / "llm" / "config.json").is_file()
        else None
    )
    with staged_folder(out, overwrite=overwrite) as tmp:
        if model is not None:
            info = write_llava(model, tmp, max_shard_size=max_shard_size)
            usage = llava_usage(info["grid"], info["prompt"], info["bos_in_prompt"]).replace(
                "FOLDER", repr(title)
            )
            notes = ["Exported as a plain `LlavaForConditionalGeneration` (no remote code)."]
        else:
            write_remote_folder(folder, tmp, dtype=dtype, max_shard_size=max_shard_size)
            usage = _REMOTE_USAGE.replace("FOLDER", repr(title))
            notes = [
                "Exported for `trust_remote_code=True` (multi-tower / SVA models have no built-in transformers class)."
            ]
        text = model_card(
            cfg,
            title=title,
            llm_config=llm_cfg,
            params=parameter_counts(folder),
            sources=find_sources(folder),
            usage=usage,
            notes=notes,
        )
        (tmp / "README.md").write_text(text)
    return Path(out).expanduser().resolve()
