"""Tiny models and datasets shared by the training tests (CPU-sized: a full run takes a few seconds)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

WORDS = [
    "lung",
    "heart",
    "rib",
    "effusion",
    "opacity",
    "normal",
    "consolidation",
    "nodule",
    "pleural",
    "clear",
    "chest",
    "film",
    "lateral",
    "view",
]


def tiny_model_cfg(stage: str = "pretrain", connector: str = "mlp2x_gelu", **extra: Any) -> dict[str, Any]:
    """A two-tower model (clip + dinov2) with a 2-layer Llama-3 LLM, built from the parts' tiny configs."""
    from cambrian_core.registry import CONNECTORS, ENCODERS, LLMS

    conn = {"type": connector, **CONNECTORS.get(connector).tiny_config()}
    return {
        "type": "cambrian",
        "vision_tower_aux_list": [
            {"type": "clip", **ENCODERS.get("clip").tiny_config()},
            {"type": "dinov2", **ENCODERS.get("dinov2").tiny_config()},
        ],
        "vision_tower_aux_token_len_list": [16, 16],
        "connector": conn,
        "llm": {"type": "llama3", **LLMS.get("llama3").tiny_config()},
        "image_token_len": 16,
        "stage": stage,
        **extra,
    }


def write_dataset(root: Path, n: int = 24, seed: int = 0, text_only_every: int = 5) -> Path:
    """``n`` LLaVA records (images of varied aspect ratios, some text-only) in ``root/records.jsonl``."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        rec: dict[str, Any] = {"id": f"s{i}"}
        if text_only_every and i % text_only_every == text_only_every - 1:
            rec["conversations"] = [
                {"from": "human", "value": f"Define {rng.choice(WORDS)}."},
                {"from": "gpt", "value": words},
            ]
        else:
            w, h = rng.choice([(40, 40), (64, 40), (30, 60), (50, 50)])
            Image.fromarray(nrng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / f"{i}.png"
            )
            rec["image"] = f"images/{i}.png"
            rec["conversations"] = [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": words},
            ]
        lines.append(json.dumps(rec))
    path = root / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_cfg(records: Path, work_dir: Path, **over: Any) -> dict[str, Any]:
    """A complete training config dict for the tiny model (fp32, no TensorBoard, no plot unless asked)."""
    cfg: dict[str, Any] = {
        "model": tiny_model_cfg(),
        "stage": "pretrain",
        "runner": {"type": "single", "device": "cpu"},
        "data": {"train": str(records), "batch_size": 2, "max_length": 256},
        "optim": {"lr": 1e-3},
        "schedule": {"max_steps": 6, "warmup_ratio": 0.0, "precision": "fp32"},
        "checkpoint": {"interval": 3, "keep_last": 2, "export": False},
        "log": {"interval": 1, "tensorboard": False, "plot": False, "mfu": False},
        "seed": 0,
        "work_dir": str(work_dir),
    }
    # plain sections merge key by key; components (model, runner) are replaced
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key not in ("model", "runner"):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def run(cfg: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Run the recipe on a config dict (validated like a file)."""
    from mmengine.config import Config

    from cambrian_core.train.recipe import TrainRecipe

    return TrainRecipe(Config(cfg), **kwargs).run()


def dump(cfg: dict[str, Any], path: Path) -> Path:
    """Write a config dict as a config file (what ``cambrian train`` reads)."""
    from mmengine.config import Config

    Config(cfg).dump(str(path))
    return path


def losses(work_dir: Path, split: str = "train") -> list[float]:
    """Losses a run logged, by step (the last value logged for a step wins, as after a resume)."""
    rows = [json.loads(line) for line in (Path(work_dir) / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if r["split"] == split}
    return [by_step[s] for s in sorted(by_step)]


def subprocess_env() -> dict[str, str]:
    """Environment for launched training processes: offline, one BLAS thread each, DeepSpeed on CPU."""
    import os

    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }


def launch(cfg: Path, launcher: str, nproc: int, timeout: float = 300) -> Any:
    """``cambrian train CFG --launcher L --nproc N`` in a subprocess (offline, CPU-friendly environment)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cambrian_core.cli", "train", str(cfg), "--launcher", launcher]
    cmd += ["--nproc", str(nproc)]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
