"""The training recipe: checks, then setup, then train, then cleanup; each step says what it does in the log.

One readable loop for both stages of reference §C (``pretrain``: connector only; ``finetune``: connector +
LLM), on any runner (``single``, ``fsdp``, ``deepspeed``, ``xla``). What runs where:

* checks: the config is validated, the data files exist, the batch arithmetic adds up, the work dir is writable.
* setup: seeds, the runner's processes, the model (stage freezing, LoRA, gradient checkpointing), the data
  (lazy JSONL, per-tower transforms, feature cache), optimiser groups with per-module lrs, the schedule, resume.
* train: gradient accumulation weighted by target tokens, clipping, NaN/inf stop, progress bar, periodic
  held-out loss and checkpoints.
* cleanup: the last checkpoint, the exported model (``save_pretrained``), the loss-curve PNG.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cambrian_core.config import ConfigError, Problem
from cambrian_core.config import check as check_config
from cambrian_core.config.schema import (
    CheckpointSection,
    DataSection,
    EvalSection,
    LogSection,
    OptimSection,
    ScheduleSection,
)
from cambrian_core.model.encoder import StagedTokens
from cambrian_core.registry import CHECKPOINTS, MODELS, RUNNERS, BuildError, build
from cambrian_core.train.checkpoint import CheckpointError, CheckpointManager, capture_rng, restore_rng
from cambrian_core.train.collate import Collator
from cambrian_core.train.data import (
    JsonlIndex,
    LazySupervisedDataset,
    Skipped,
    SkipReport,
    image_paths,
    skip_code,
    tower_transform,
)
from cambrian_core.train.feature_cache import FeatureCache, content_hash, human_bytes
from cambrian_core.train.metrics import (
    FlopsCounter,
    MetricLogger,
    NonFiniteLossError,
    check_finite,
    device_peak_flops,
    plot_loss_curve,
)
from cambrian_core.train.optim import build_optimizer, build_scheduler, param_groups, scaled_lr
from cambrian_core.train.runners.base import NonFiniteGradError
from cambrian_core.train.sampler import GroupedBatchSampler

__all__ = ["ImageTokenCounter", "RecordTokenizer", "TrainRecipe", "seed_everything"]

log = logging.getLogger("cambrian.train")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RecordTokenizer:
    """LLaVA record -> ``(input_ids, labels, num_images)`` with the template's exact target masking (picklable)."""

    def __init__(self, tokenizer: Any, template: Any) -> None:
        self.tokenizer, self.template = tokenizer, template

    def __call__(self, record: dict[str, Any]) -> tuple[list[int], list[int], int]:
        from cambrian_core.model.tokenize import messages_from_llava, tokenize_conversation

        conv = tokenize_conversation(
            self.tokenizer, self.template, messages_from_llava(record), num_images=len(image_paths(record))
        )
        return conv.input_ids, conv.labels, conv.num_images


class ImageTokenCounter:
    """Tokens one image of ``(width, height)`` occupies in the LLM sequence: the kept rows of the ``f x f``
    grid, each with its newline (all ``f`` rows when the model does not unpad)."""

    def __init__(self, grid: int, unpad: bool) -> None:
        self.grid, self.unpad = grid, unpad

    def __call__(self, width: int, height: int) -> int:
        from cambrian_core.model.masks import real_extents

        if not self.unpad:
            return self.grid * (self.grid + 1)
        r0, r1, c0, c1 = real_extents(torch.tensor([[width, height]]), self.grid)[0].tolist()
        return (r1 - r0) * (c1 - c0 + 1)


def _section(cls: type, cfg: Any, key: str) -> Any:
    """A typed config section (the dataclass defaults are the only defaults; the schema already checked keys)."""
    value = cfg.get(key) or {}
    return cls(**dict(value))


def _as_list(x: str | Sequence[str] | None) -> list[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def _with_images(batch: dict[str, Any], dataset: Any) -> bool:
    """Whether a micro-batch's samples carry images (from the samples it asked for, skipped ones included):
    global batches hold one modality, so a rank standing in for a skipped share must run that modality."""
    asked = [*batch.get("indices", ()), *(s.index for s in batch["skipped"])]
    return dataset.has_image_at(asked[0]) if asked else False


class TrainRecipe:
    """A training run from a resolved config.

    Args:
        cfg: the loaded config (mmengine ``Config``; see ``cambrian_core.config.load_config``).
        config_path: the file it came from (names the work dir and attributes config problems).
        work_dir: output folder (default: ``cfg.work_dir``, else ``work_dirs/<config name>``).
        resume: ``auto`` (newest complete checkpoint, if any), a checkpoint folder, or ``None``.
        dry_run: stop after setup (prints the plan: trainable modules, data, steps, lrs).
        check_pixels: the dry run's data check also decodes every image (slower; finds truncated pixel data).
    """

    def __init__(
        self,
        cfg: Any,
        config_path: str | os.PathLike | None = None,
        work_dir: str | os.PathLike | None = None,
        resume: str | None = None,
        dry_run: bool = False,
        check_pixels: bool = False,
    ) -> None:
        self.cfg = cfg
        self.check_pixels = check_pixels
        self.config_path = Path(config_path) if config_path else None
        name = self.config_path.stem if self.config_path else "run"
        self.work_dir = Path(work_dir or cfg.get("work_dir") or Path("work_dirs") / name)
        self.resume = resume if resume is not None else cfg.get("resume")
        self.dry_run = dry_run
        self.data: DataSection = _section(DataSection, cfg, "data")
        self.optim: OptimSection = _section(OptimSection, cfg, "optim")
        self.sched: ScheduleSection = _section(ScheduleSection, cfg, "schedule")
        self.ckpt: CheckpointSection = _section(CheckpointSection, cfg, "checkpoint")
        self.logcfg: LogSection = _section(LogSection, cfg, "log")
        self.seed = int(cfg.get("seed", 0))
        self.skips = SkipReport()
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.last_eval_step = -1
        self.applied_lr = 0.0  # the learning rate of the last update (logged as `lr`)

    # =============================================================================================== run
    def run(self) -> dict[str, Any]:
        """checks -> setup -> train -> cleanup; returns a summary (steps, last loss, paths)."""
        try:
            return self._run()
        finally:
            handler = getattr(self, "_log_handler", None)
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()

    def _run(self) -> dict[str, Any]:
        self.checks()
        self.setup()
        if self.dry_run:
            self.check_data()
            self.announce("dry run: stopping after setup")
            self.runner.teardown()
            return self.summary()
        try:
            self.train()
        except NonFiniteLossError:
            self.logger.close()
            self.runner.teardown()
            raise
        self.cleanup()
        return self.summary()

    def check_data(self) -> SkipReport:
        """Every training and held-out sample through the checks that need no pixel data (record, image files
        and headers, target mask, truncation): what training would skip, by reason, with file and line.

        Each rank checks every ``world_size``-th sample; one all-reduce of per-sample reason codes brings the
        verdicts to rank 0, which re-reads a few examples per reason for their details and announces. The
        skipped samples are added to ``self.skips`` on rank 0 (so the run's summary has the counts). Pixel
        data is decoded only with ``check_pixels`` (``--check-pixels``): otherwise an image whose header is fine
        but whose data is truncated is only found (and skipped) when training reads it.
        """
        from tqdm.auto import tqdm

        r = self.runner
        for name, ds in (("training", self.train_set), ("held-out", self.val_set)):
            if ds is None or not len(ds):
                continue
            codes = torch.zeros(len(ds), dtype=torch.float64)
            mine = range(r.rank, len(ds), r.world_size)
            desc = f"dry run: checking {name} samples" + (
                f" (1/{r.world_size} per rank)" if r.world_size > 1 else ""
            )
            for i in tqdm(mine, desc=desc, unit="sample", leave=False, disable=not r.is_main):
                skipped = ds.check(i, decode=self.check_pixels)
                if skipped is not None:
                    codes[i] = skip_code(skipped.reason)
            codes = r.all_reduce(codes)  # each sample was checked by exactly one rank
            if not r.is_main:
                continue
            report = SkipReport()
            labels: dict[int, str] = {}
            for i in codes.nonzero().flatten().tolist():
                code = int(codes[i])
                if code not in labels or report.counts[labels[code]] < report.keep:
                    skipped = ds.check(i, decode=self.check_pixels) or Skipped(
                        i, "not skipped when read again"
                    )  # the details, here
                    labels.setdefault(code, skipped.reason)
                else:
                    skipped = Skipped(i, labels[code])
                report.add(skipped, ds.where)
                self.skips.add(skipped, ds.where)
            if report.total:
                self.announce(
                    f"dry run: {report.total} of {len(ds)} {name} samples would be skipped: {report.details()}"
                )
            else:
                self.announce(f"dry run: all {len(ds)} {name} samples pass the data checks")
        return self.skips

    def announce(self, text: str) -> None:
        if getattr(self, "runner", None) is None or self.runner.is_main:
            log.info("== %s", text)

    # =============================================================================================== checks
    def _connector_compile_problem(self) -> str | None:
        """The configured connector's reason not to compile it with this torch (``None`` if none or unknown)."""
        from cambrian_core.model.checks import connector_config
        from cambrian_core.registry import CONNECTORS

        model = self.cfg.get("model")
        try:
            cls = CONNECTORS.lookup(connector_config(model)["type"])
        except Exception:  # no model section / unknown type: reported by the other checks
            return None
        probe = getattr(cls, "compile_problem", None)
        return probe() if probe is not None else None

    def checks(self) -> None:
        """Everything that can be wrong before any weight loads, reported at once."""
        self.announce(f"checks: config {self.config_path or '<in memory>'}")
        check_config(self.cfg, str(self.config_path) if self.config_path else None)
        problems: list[Problem] = []
        if "model" not in self.cfg:
            problems.append(Problem("model", "no model section: add model=dict(type='cambrian', ...)"))
        train_files = _as_list(self.data.train)
        if not train_files:
            problems.append(
                Problem("data.train", "no training file (a records.jsonl written by `cambrian convert`)")
            )
        for key in ("train", "val"):
            for f in _as_list(getattr(self.data, key)):
                if not Path(f).is_file():
                    problems.append(
                        Problem(
                            f"data.{key}", f"file not found: {f} (run `cambrian convert ...` or fix the path)"
                        )
                    )
        if not 0.0 <= self.data.val_fraction < 1.0:
            problems.append(Problem("data.val_fraction", f"{self.data.val_fraction} must be in [0, 1)"))
        held_out = bool(self.data.val) or self.data.val_fraction > 0
        if self.sched.eval_interval and not held_out and not self.cfg.get("eval"):
            problems.append(
                Problem(
                    "schedule.eval_interval",
                    f"{self.sched.eval_interval} but this run evaluates nothing: set data.val or "
                    "data.val_fraction (held-out loss) or an eval section (VQA metrics), or remove it",
                )
            )
        if self.cfg.get("eval"):
            problems.extend(self._eval_section_problems())
        if self.sched.eval_max_batches and not held_out:
            problems.append(
                Problem(
                    "schedule.eval_max_batches",
                    f"{self.sched.eval_max_batches} limits a held-out loss this run does not compute: set "
                    "data.val or data.val_fraction, or remove it",
                )
            )
        for key, value in (
            ("data.batch_size", self.data.batch_size),
            ("schedule.grad_accum", self.sched.grad_accum),
        ):
            if value < 1:
                problems.append(Problem(key, f"{value} must be >= 1"))
        if self.sched.epochs < 1 and self.sched.max_steps <= 0:
            problems.append(Problem("schedule", "set schedule.epochs >= 1 or schedule.max_steps > 0"))
        load_from = self.cfg.get("load_from")
        if load_from and not Path(load_from).exists() and str(load_from) not in CHECKPOINTS:
            problems.append(
                Problem(
                    "load_from",
                    f"{load_from} is neither a folder nor a registered checkpoint name (train the previous "
                    "stage first, or fix the path; `cambrian models list` shows the names)",
                )
            )
        stage = self.cfg.get("stage")
        if stage is not None and stage not in ("pretrain", "finetune", "full"):
            problems.append(Problem("stage", f"{stage!r} is not a stage; choose pretrain, finetune or full"))
        runner_type = (self.cfg.get("runner") or {}).get("type", "single")
        if self.sched.compile_connector:
            problem = self._connector_compile_problem()
            if problem:
                problems.append(Problem("schedule.compile_connector", problem))
        if self.sched.compile_connector and runner_type in ("deepspeed", "xla"):
            problems.append(
                Problem(
                    "schedule.compile_connector",
                    f"is supported with the single and fsdp runners, not runner.type={runner_type!r} "
                    "(DeepSpeed gathers ZeRO-3 parameters in hooks that torch.compile does not trace; XLA compiles "
                    "the whole step itself); remove it or switch runners",
                )
            )
        if problems:
            raise ConfigError(problems, str(self.config_path) if self.config_path else None)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.work_dir, os.W_OK):
            raise PermissionError(f"work dir {self.work_dir} is not writable; pass --work-dir")
        self._setup_logging(is_main=int(os.environ.get("RANK", "0")) == 0)
        free = shutil.disk_usage(self.work_dir).free
        self.announce(f"checks passed; work dir {self.work_dir} ({human_bytes(free)} free)")

    # =============================================================================================== setup
    def setup(self) -> None:
        self.announce("setup: runner")
        seed_everything(self.seed)
        self.runner = build(RUNNERS, self.cfg.get("runner") or {"type": "single"})
        self.runner.setup()
        self.announce(
            f"setup: {self.runner.name} runner, rank {self.runner.rank}/{self.runner.world_size} on {self.runner.device}"
        )
        self._setup_model()
        self.vqa_hook = self._setup_vqa_hook()
        self._setup_data()
        self._setup_optimization()
        self._setup_resume()
        self.logger = MetricLogger(
            self.work_dir,
            self.total_steps,
            self.step,
            enabled=self.runner.is_main and not self.dry_run,
            tensorboard=self.logcfg.tensorboard,
            wandb=self.logcfg.wandb,
            config=self.cfg.to_dict() if hasattr(self.cfg, "to_dict") else dict(self.cfg),
        )

    def _config_error(self, key: str, message: str) -> None:
        """Raise a setup finding as a config error (the CLI's exit 2 with its message, no traceback)."""
        raise ConfigError([Problem(key, message)], str(self.config_path) if self.config_path else None)

    def _eval_section_problems(self) -> list[Problem]:
        """The ``eval`` section checked before training (not found out at the first evaluation, hours later)."""
        from cambrian_core.eval.loaders import DataLayoutError, benchmark
        from cambrian_core.eval.loaders.common import split_name
        from cambrian_core.eval.scoring import build_metrics

        ev = _section(EvalSection, self.cfg, "eval")
        out = []
        try:
            bench = benchmark(ev.benchmark)
        except ValueError as exc:
            return [Problem("eval.benchmark", str(exc))]
        unknown = sorted(set(ev.options) - set(bench.options()))
        if unknown:
            out.append(
                Problem(
                    "eval.options",
                    f"{bench.name} takes no option(s) {unknown}; its options: {bench.options() or 'none'}"
                    + (
                        " (slake is the English rows, slake_zh the Chinese ones)" if "lang" in unknown else ""
                    ),
                )
            )
        if ev.split is not None and "any" not in bench.splits:
            try:  # as the loader reads it (case, validation aliases)
                split_name(ev.split, bench.splits, bench.name)
            except DataLayoutError as exc:
                out.append(Problem("eval.split", str(exc)))
        if not ev.data or not Path(ev.data).exists():
            out.append(
                Problem(
                    "eval.data",
                    f"{ev.data or '(empty)'} does not exist: the benchmark's local folder or file",
                )
            )
        try:
            build_metrics(ev.metrics)
        except (ValueError, KeyError, BuildError) as exc:
            out.append(Problem("eval.metrics", str(exc).strip("'\"")))
        return out

    def _setup_vqa_hook(self) -> Any:
        """An :class:`~cambrian_core.eval.hook.EvalHook` for the ``eval`` section, or ``None``."""
        section = self.cfg.get("eval")
        if not section:
            return None
        ev = _section(EvalSection, self.cfg, "eval")
        from cambrian_core.eval.hook import EvalHook

        where = " (an unsharded copy gathered on rank 0)" if self.runner.world_size > 1 else ""
        self.announce(f"setup: VQA evaluation on {ev.limit} items of {ev.benchmark} ({ev.data}){where}")
        return EvalHook(
            ev.benchmark,
            ev.data,
            split=ev.split,
            limit=ev.limit,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            prompt_style=ev.prompt_style,
            metrics=ev.metrics,
            out_dir=self.work_dir / "vqa_eval",
            **ev.options,
        )

    def _setup_logging(self, is_main: bool) -> None:
        """``train.log`` and the resolved config (``config.py`` + ``config.json``) in the work dir (main rank)."""
        if not is_main:
            logging.getLogger().setLevel(logging.WARNING)
            return
        handler = logging.FileHandler(self.work_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        self._log_handler = handler  # removed when the run ends (a second run in the process logs elsewhere)
        logging.getLogger().setLevel(logging.INFO)
        if hasattr(self.cfg, "dump"):
            self.cfg.dump(str(self.work_dir / "config.py"))
        tree = self.cfg.to_dict() if hasattr(self.cfg, "to_dict") else dict(self.cfg)
        (self.work_dir / "config.json").write_text(json.dumps(tree, indent=2, default=str))

    def _setup_model(self) -> None:
        from cambrian_core.train.lora import LoraSettings, apply_lora

        self.announce("setup: model")
        model = build(MODELS, self.cfg.model)
        load_from = self.cfg.get("load_from")
        if load_from:
            path = Path(load_from)
            if not path.exists():  # a registered checkpoint name (checked above)
                from cambrian_core.model.checkpoints import resolve_folder

                path = resolve_folder(str(load_from))
            self._load_from(model, path)
        stage = self.cfg.get("stage") or model.stage
        if stage != model.stage:
            self.announce(f"setup: stage `{stage}` (freezing)")
            model.set_stage(stage, log_table=self.runner.is_main)
        self.lora = LoraSettings.from_config(self.cfg.lora) if self.cfg.get("lora") else None
        if self.lora is not None:
            self.announce("setup: " + apply_lora(model, self.lora, self.runner.device))
        if self.sched.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.sched.compile_connector:
            self.announce("setup: connector compiled with torch.compile (the first steps include compiling)")
            model.compile_connector()
        self.cached = bool(self.data.feature_cache)
        if self.cached:
            trainable = [
                i for i, t in enumerate(model.towers) if any(p.requires_grad for p in t.parameters())
            ]
            if trainable:
                self._config_error(
                    "data.feature_cache",
                    f"is set but stage `{stage}` trains towers {trainable}; cached features would go stale at the "
                    "first update. Use the cache only with frozen towers (pretrain, or finetune with freeze=True "
                    "towers)",
                )
        self.flops = FlopsCounter(model, cached_towers=self.cached) if self.logcfg.mfu else None
        self.model = model

    def _load_from(self, model: torch.nn.Module, path: Path) -> None:
        """Initial weights: a saved model folder (``save_pretrained``) or a training checkpoint."""
        from safetensors.torch import load_file

        from cambrian_core.model.io import CONFIG_NAME, load_weights

        if (path / CONFIG_NAME).is_file():
            state = load_weights(path)
        elif (path / "trainable.safetensors").is_file():
            state = load_file(str(path / "trainable.safetensors"))
        else:
            raise FileNotFoundError(
                f"load_from={path}: neither a saved model ({CONFIG_NAME}) nor a training checkpoint "
                "(trainable.safetensors)"
            )
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            self._config_error(
                "load_from",
                f"{path}: {len(result.unexpected_keys)} weights do not fit this model "
                f"(e.g. {result.unexpected_keys[:3]}); is it the same architecture?",
            )
        self.announce(
            f"setup: loaded {len(state)} tensors from {path} ({len(result.missing_keys)} kept from the config)"
        )

    def _setup_data(self) -> None:
        self.announce("setup: data")
        model, d = self.model, self.data
        index_cache = self.work_dir / "index"
        index = JsonlIndex(_as_list(d.train), cache_dir=index_cache)
        counter = ImageTokenCounter(model.grid, model.unpad)
        tokenize = RecordTokenizer(model.llm.tokenizer, model.llm.template)
        transforms = [tower_transform(t) for t in model.towers]
        common = dict(
            tokenize=tokenize,
            transforms=transforms,
            image_tokens=counter,
            max_length=d.max_length,
            image_folder=d.image_folder,
        )
        if d.val:
            val_index = JsonlIndex(_as_list(d.val), cache_dir=index_cache)
            train_ids, val_ids = np.arange(len(index)), None
            if d.val_fraction > 0:  # (a dataset base sets it; the held-out file takes its place)
                self.announce(f"setup: held out: data.val; data.val_fraction={d.val_fraction} is not used")
        else:
            perm = np.random.default_rng(self.seed).permutation(len(index))
            n_val = round(len(index) * d.val_fraction)
            val_index, train_ids, val_ids = index, np.sort(perm[n_val:]), np.sort(perm[:n_val])
        if not any(p.requires_grad for p in model.llm.parameters()):
            # nothing a text-only sample reaches trains in this stage (the LLM is frozen): it carries no gradient
            # (malformed lines stay: reading them reports them, so they are never dropped unannounced)
            text_only = (index.num_images == 0) & ~index.malformed
            if text_only[train_ids].any():
                n_text = int(text_only[train_ids].sum())
                train_ids = train_ids[~text_only[train_ids]]
                self.announce(f"setup: {n_text} text-only samples left out (the LLM is frozen in this stage)")
        self.train_set = LazySupervisedDataset(index, subset=train_ids, **common)
        self.val_set = (
            LazySupervisedDataset(val_index, subset=val_ids, **common) if d.val or len(val_ids) else None
        )
        if self.cached:
            caches = self._build_feature_caches([s for s in (self.train_set, self.val_set) if s is not None])
            for s in (self.train_set, self.val_set):
                if s is not None:
                    s.feature_caches = caches
        r = self.runner
        try:
            self.sampler = GroupedBatchSampler(
                self.train_set.lengths,
                d.batch_size,
                self.train_set.has_image,
                d.group_by_length,
                world_size=r.world_size,
                rank=r.rank,
                seed=self.seed,
            )
        except ValueError as exc:  # too few usable samples: a problem of data.train, said as one
            where = str(self.config_path) if self.config_path else None
            took = []
            if val_ids is not None and d.val is None and len(val_ids):
                took.append(f"data.val_fraction={d.val_fraction} holds out {len(val_ids)}")
            if len(train_ids) + (0 if val_ids is None or d.val is not None else len(val_ids)) < len(index):
                took.append("text-only samples are left out in this stage (the LLM is frozen)")
            why = f" ({len(index)} records; {'; '.join(took)})" if took else ""
            raise ConfigError([Problem("data.train", f"{d.train}: {exc}{why}")], where) from None
        left = self.sampler.left_out()
        if any(left.values()):
            gb = self.sampler.global_batch
            counts = {"image": int(self.sampler.has_image.sum())}
            counts["text"] = len(self.sampler.has_image) - counts["image"]
            parts = [
                f"{n} of {counts[kind]} {kind} sample(s)"
                + (" (all of them: fewer than one batch)" if n == counts[kind] else "")
                for kind, n in left.items()
                if n
            ]
            self.announce(
                f"setup: batches hold one modality each, so every epoch leaves out {' and '.join(parts)} at "
                f"random (the remainders of a global batch of {gb})"
            )
        collate = Collator(model.llm.tokenizer.pad_token_id, d.packing, d.max_length, d.pad_to_multiple_of)
        self.collate = collate
        self.loader = self._loader(self.train_set, self.sampler)
        n_val = len(self.val_set) if self.val_set is not None else 0
        self.announce(
            f"setup: {len(self.train_set)} training samples ({int(self.train_set.has_image.sum())} with images), "
            f"{n_val} held out; {len(self.sampler)} micro-batches of {d.batch_size} per rank per epoch; "
            f"max_length {d.max_length}, packing {'on' if d.packing else 'off'}"
        )

    def _loader(self, dataset: LazySupervisedDataset, sampler: Any) -> torch.utils.data.DataLoader:
        workers = self.data.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.runner.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed),  # never draws from the global RNG
        )

    def _build_feature_caches(self, datasets: list[LazySupervisedDataset]) -> list[FeatureCache]:
        """One cache per tower; missing features are computed (main rank) after printing their size."""
        self.announce(f"setup: feature cache at {self.data.feature_cache}")
        items: dict[str, Path] = {}
        for ds in datasets:
            for i in range(len(ds)):
                try:
                    rec = ds.read_record(i)
                except ValueError:
                    continue
                for rel in image_paths(rec):
                    p = ds.resolve_image(i, rel)
                    if p.is_file():
                        items.setdefault(content_hash(p), p)
        # what the connector takes: SVA gets a multi-stage tower's stages (smaller, and its live input)
        staged = bool(self.model.connector.accepts_staged)
        caches = [FeatureCache(self.data.feature_cache, t, staged=staged) for t in self.model.towers]
        if self.runner.is_main:
            for t, (tower, cache) in enumerate(zip(self.model.towers, caches, strict=True)):
                status = cache.status(items)
                for old in status.stale:
                    log.warning(
                        "feature cache %s belongs to other weights of %s: not used (delete it to free space)",
                        old,
                        cache.tower_class,
                    )
                if status.bad_shards:
                    log.warning(
                        "feature cache %s: shards %s are missing or truncated; rebuilding their images",
                        cache.folder,
                        status.bad_shards,
                    )
                if status.complete:
                    self.announce(
                        f"setup: tower {t} ({cache.tower_class}): all {status.cached} images cached in {cache.folder}"
                    )
                    continue
                need = cache.estimate_bytes(len(status.missing))
                free = shutil.disk_usage(Path(self.data.feature_cache).resolve().anchor).free
                self.announce(
                    f"setup: tower {t} ({cache.tower_class}): {'would build' if self.dry_run else 'building'} "
                    f"{len(status.missing)} of {len(items)} images x "
                    f"{cache.describe()} bf16 = {human_bytes(need)} in {cache.folder} "
                    f"({human_bytes(free)} free)"
                )
                if need > free:
                    raise OSError(
                        f"the feature cache needs {human_bytes(need)} but only {human_bytes(free)} is free"
                    )
                if self.dry_run:  # a dry run plans; building is the first thing a real run does
                    continue
                cache.build(
                    {h: items[h] for h in status.missing},
                    partial(_encode_images, tower, cache.stages is not None),
                )
                if (
                    cache.unreadable
                ):  # left out of the cache; their samples are skipped (and counted) in training
                    shown = "; ".join(list(cache.unreadable.values())[:5])
                    log.warning(
                        "feature cache: %d image(s) did not decode and are skipped in training: %s",
                        len(cache.unreadable),
                        shown,
                    )
        self.runner.barrier()
        return caches

    def _setup_optimization(self) -> None:
        self.announce("setup: optimiser and schedule")
        o, s, r = self.optim, self.sched, self.runner
        self.global_batch = self.data.batch_size * s.grad_accum * r.world_size
        lr, groups = o.lr, dict(o.lr_groups)
        if o.scale_lr_by_batch:
            lr = scaled_lr(o.lr, self.global_batch, o.base_batch_size)
            groups = {k: scaled_lr(v, self.global_batch, o.base_batch_size) for k, v in groups.items()}
            self.announce(
                f"setup: lr scaled by sqrt({self.global_batch}/{o.base_batch_size}): base {o.lr:g} -> {lr:g}"
            )
        micro = len(self.sampler)  # micro-batches per rank and epoch
        if micro < s.grad_accum:
            self._config_error(
                "schedule.grad_accum",
                f"{s.grad_accum} but one epoch has {micro} micro-batches per rank; lower grad_accum or "
                "data.batch_size",
            )
        self.updates_per_epoch = -(-micro // s.grad_accum)  # a shorter last window still makes an update
        if micro % s.grad_accum:
            self.announce(
                f"setup: {micro} micro-batches per rank and epoch is not a multiple of schedule.grad_accum="
                f"{s.grad_accum}: the last update of every epoch accumulates {micro % s.grad_accum} of them "
                "(its loss is still the mean over its target tokens)"
            )
        self.total_steps = s.max_steps if s.max_steps > 0 else s.epochs * self.updates_per_epoch

        def make_optimizer(named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
            pg = param_groups(named, lr, groups, o.weight_decay)
            if r.is_main:
                for g in pg:
                    n = sum(p.numel() for p in g["params"])
                    log.info(
                        "  param group %-32s lr %.2e  wd %g  %12s params",
                        g["name"],
                        g["lr"],
                        g["weight_decay"],
                        f"{n:,}",
                    )
            return build_optimizer(pg, o.type, o.betas, o.eps)

        make_scheduler = partial(
            build_scheduler,
            total_steps=self.total_steps,
            warmup_ratio=s.warmup_ratio,
            kind=s.scheduler,
            min_ratio=s.min_lr_ratio,
        )
        r.prepare(
            self.model,
            make_optimizer,
            make_scheduler,
            s.precision,
            s.clip_grad,
            s.grad_accum,
            self.data.batch_size,
        )
        self.peak_flops, peak_from = device_peak_flops(r.device, s.precision, self.logcfg.peak_tflops)
        self.announce(
            f"setup: {self.total_steps} updates ({self.updates_per_epoch} per epoch) of global batch "
            f"{self.global_batch} = {self.data.batch_size} x accum {s.grad_accum} x {r.world_size} rank(s); "
            f"{s.precision}, MFU peak {self.peak_flops / 1e12:.2f} TFLOP/s ({peak_from})"
        )

    def _setup_resume(self) -> None:
        r = self.runner
        self.checkpoints = CheckpointManager(
            self.work_dir / "checkpoints", self.ckpt.keep_last, r.is_main, r.barrier
        )
        folder = self.checkpoints.resolve(self.resume)
        self.last_checkpoint: Path | None = folder
        self.resume_rng = None
        if folder is None:
            if self.resume not in (None, False, "", "none"):
                self.announce("setup: --resume auto found no complete checkpoint; starting from step 0")
            self._set_aside_earlier_run()
            return
        self.announce(f"setup: resuming from {folder}")
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        try:  # first: a position that cannot be used fails before the weights load
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as exc:
            raise CheckpointError(f"--resume {folder}: {exc}") from None
        r.load_state(folder)
        self.step = int(state["step"])
        self._set_aside_later_checkpoints()
        self._announce_optim_changes(folder)
        self.history = list(state.get("history", []))
        # the run's cumulative skip counts and its last held-out evaluation go on from where they were
        self.skips.counts.update({str(k): int(v) for k, v in state.get("skipped", {}).items()})
        for reason, examples in state.get("skip_examples", {}).items():
            self.skips.examples.setdefault(str(reason), [str(e) for e in examples])
        self.last_eval_step = int(state.get("last_eval_step", self.last_eval_step))
        rng = folder / f"rng_rank{r.rank}.pt"
        self.resume_rng = torch.load(rng, weights_only=True) if rng.is_file() else None

    #: what a run leaves in its work dir that a new run from step 0 would mix with its own
    _RUN_OUTPUTS = (
        "checkpoints",
        "metrics.jsonl",
        "loss_curve.png",
        "tensorboard",
        "vqa_eval",
        "lora_adapter",
    )

    def _set_aside_earlier_run(self) -> None:
        """A run from step 0 in a work dir that holds an earlier run's checkpoints and metrics moves them to
        ``previous/<time>/`` first: its checkpoint rotation would otherwise delete its own newer checkpoints
        (lower step numbers) and keep the old run's, and ``--resume auto`` would continue the wrong run."""
        r = self.runner
        if r.is_main and not self.dry_run:
            ckpts = self.work_dir / "checkpoints"
            found = [n for n in self._RUN_OUTPUTS if (self.work_dir / n).exists()]
            if (ckpts.is_dir() and any(ckpts.iterdir())) or "metrics.jsonl" in found:
                dest = self._previous_dir()
                for name in found:
                    os.replace(self.work_dir / name, dest / name)
                self.announce(
                    f"setup: an earlier run's {', '.join(found)} moved to {dest} (this run starts at step 0; "
                    "pass --resume auto to continue a run instead)"
                )
        r.barrier()

    def _announce_optim_changes(self, folder: Path) -> None:
        """Name the ``optim`` settings changed since ``folder`` was saved: the optimiser state it restores (each
        group's lr, weight decay, betas, eps) is what the resumed run goes on with, as in HF Trainer."""
        try:
            old = json.loads((folder / "config.json").read_text()).get("optim") or {}
            before = json.loads(json.dumps(dataclasses.asdict(OptimSection(**old))))
        except (OSError, ValueError, TypeError):  # no readable config there (older or foreign checkpoint)
            return
        now = json.loads(json.dumps(dataclasses.asdict(self.optim)))
        changed = [f"optim.{k} {before[k]!r} -> {now[k]!r}" for k in now if before.get(k) != now[k]]
        if changed:
            self.announce(
                f"setup: WARNING: changed since {folder.name} was saved and NOT applied (its optimiser state "
                f"keeps the old values): {', '.join(changed)}; to train on with them, start a new run with "
                f"load_from={folder} (its weights, a fresh optimiser and schedule)"
            )

    def _previous_dir(self) -> Path:
        """A new, empty ``work_dir/previous/<time>/`` for outputs of an abandoned run."""
        dest = self.work_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
        while dest.exists():
            dest = dest.with_name(dest.name + "+")
        dest.mkdir(parents=True)
        return dest

    def _set_aside_later_checkpoints(self) -> None:
        """Resuming from an earlier step than this work dir's newest checkpoint (a rollback) moves the later
        checkpoints to ``previous/<time>/checkpoints/``: rotation would otherwise delete the resumed run's new
        checkpoints (lower step numbers) first, and ``--resume auto`` would go back to the abandoned run."""
        r = self.runner
        if r.is_main and not self.dry_run:
            later = self.checkpoints.later_than(self.step)
            if later:
                dest = self._previous_dir() / "checkpoints"
                dest.mkdir()
                for folder in later:
                    os.replace(folder, dest / folder.name)
                self.announce(
                    f"setup: this run goes on from step {self.step}, so the abandoned run's later checkpoints "
                    f"{', '.join(f.name for f in later)} moved to {dest}"
                )
        r.barrier()

    # =============================================================================================== train
    def _windows(self) -> Iterator[list[dict[str, Any]]]:
        """Micro-batch windows (one per update), epoch after epoch, starting at the sampler's position.

        ``self.consumed`` is the number of micro-batches of the current epoch used once a window is handed out
        (what a checkpoint stores). An epoch whose micro-batches are not a multiple of ``grad_accum`` ends with
        a shorter window (as HF Trainer and LLaVA do), so no batch of the epoch is left out.
        """
        accum, micro = self.sched.grad_accum, len(self.sampler)
        while True:
            start = (
                self.sampler.start_batch
            )  # before iter(): a worker-backed loader starts the sampler at once
            it = iter(self.loader)
            for pos in range(start, micro, accum):
                window = [next(it) for _ in range(min(accum, micro - pos))]
                self.consumed = pos + len(window)
                yield window
            del it
            self.sampler.set_epoch(self.sampler.epoch + 1)

    def train(self) -> None:
        """One update per window of ``grad_accum`` micro-batches until ``total_steps``."""
        self.announce(f"train: steps {self.step + 1}..{self.total_steps}")
        if self.resume_rng is not None:
            restore_rng(self.resume_rng)  # last, so nothing in setup shifts the stream
        self.runner.model.train()
        self.fallback: dict[bool, dict[str, Any]] = {}  # the last usable micro-batch with / without images
        self.consumed = self.sampler.start_batch
        windows = self._windows()
        empty = 0  # windows in a row whose samples were all skipped
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            done = self._update(next(windows))
            if done is None:
                empty += 1
                if empty > self.updates_per_epoch:
                    raise RuntimeError(
                        f"no usable sample in {empty} windows in a row (a whole epoch): {self.skips.details()}; "
                        "`cambrian train CONFIG --dry-run` lists every sample training skips"
                    )
                continue
            empty = 0
            totals, grad_norm = done
            self.step += 1
            self._report(totals, grad_norm, time.perf_counter() - t0)
            if self.sched.eval_interval and self.step % self.sched.eval_interval == 0:
                self._evaluate_all()
            if self.step % self.ckpt.interval == 0 and self.step < self.total_steps:
                self.save()

    def _update(self, window: list[dict[str, Any]]) -> tuple[torch.Tensor, float] | None:
        """Forward / backward every micro-batch of ``window``, then one optimiser step.

        Each micro-batch weighs its share of the update's target tokens over all ranks (ranks' gradients are
        averaged, hence the world size), so the update equals one big batch's token-mean loss. Returns the
        rank-summed ``[loss x targets, targets, tokens, samples, flops]`` and the gradient norm, or ``None``
        when every sample of the window was skipped (no step is taken: the optimiser's momentum and weight
        decay would still move the weights, and the schedule would advance).
        """
        r = self.runner
        for b in window:
            for sk in b["skipped"]:
                self.skips.add(sk)
        local_targets = sum(b.get("num_target_tokens", 0) for b in window)
        total_targets = float(r.all_reduce(torch.tensor([float(local_targets)]))[0]) / r.world_size
        if not total_targets:  # every sample of the window was skipped, on every rank: no update
            return None
        loss_sum, tokens, samples, flops = 0.0, 0, 0, 0.0
        for k, batch in enumerate(window):
            weight = batch.get("num_target_tokens", 0) / total_targets if total_targets else 0.0
            if not batch["num_samples"]:  # every sample of this micro-batch was skipped
                if r.world_size == 1:
                    continue
                images = _with_images(batch, self.train_set)
                if images not in self.fallback:
                    self.fallback[images] = self._stand_in(self.train_set, images, "a training micro-batch")
                # the other ranks run the same modules on their share; this one adds no gradient
                batch, weight = self.fallback[images], 0.0
            loss = r.forward(batch)
            if not loss.requires_grad:
                raise RuntimeError(
                    f"the loss of samples {batch.get('indices')} reaches no trainable weight (text-only samples "
                    "while only the connector trains?); check the stage and the data"
                )
            value = float(loss.detach().float().cpu())
            if r.all_reduce(torch.tensor([0.0 if np.isfinite(value) else 1.0]), "max").item():
                shown = value if not np.isfinite(value) else float("nan")  # another rank's loss went bad
                check_finite(shown, self.step + 1, self.last_checkpoint, batch.get("indices"))
            r.backward(loss * weight, last_micro=k == len(window) - 1)
            if weight:
                self.fallback[_with_images(batch, self.train_set)] = batch
                loss_sum += value * batch["num_target_tokens"]
                tokens += batch["num_tokens"]
                samples += batch["num_samples"]
                if self.flops is not None:  # each sample attends within itself (packed or not)
                    head = batch["num_target_tokens"] if r.TARGET_LOGITS_ONLY else None
                    n_img = len(batch["image_sizes"])
                    flops += self.flops.step_flops(batch["num_tokens"], batch["sample_lengths"], n_img, head)
        self.applied_lr = max(r.current_lrs().values())  # what this update uses: step() moves the schedule on
        try:
            grad_norm = r.step()
        except NonFiniteGradError as exc:  # a finite loss whose backward overflowed (bf16, a bad sample)
            check_finite(
                exc.norm, self.step + 1, self.last_checkpoint, what="the gradient norm", applied=exc.applied
            )
        totals = r.all_reduce(
            torch.tensor([loss_sum, float(local_targets), float(tokens), float(samples), flops])
        )
        return totals, grad_norm

    def _report(self, totals: torch.Tensor, grad_norm: float, dt: float) -> None:
        """Progress bar, metrics sinks and the skip summary for the step just taken."""
        r = self.runner
        loss = float(totals[0] / max(totals[1], 1.0))
        values = {
            "loss": loss,
            "lr": self.applied_lr,
            "grad_norm": grad_norm,
            "samples_s": float(totals[3]) / dt,
            "tokens_s": float(totals[2]) / dt,
            "epoch": self.sampler.epoch + self.consumed / len(self.sampler),
        }
        if self.flops is not None:
            values["mfu"] = float(totals[4]) / dt / (self.peak_flops * r.world_size)
        self.history.append({"step": self.step, "loss": loss})
        self.logger.advance()
        if self.step % self.logcfg.interval == 0 or self.step in (1, self.total_steps):
            self.logger.log(self.step, {**values, "skipped": float(self.skips.total)})
            if self.skips.total:
                self.logger.message(f"step {self.step}: {self.skips.summary()}")

    def _evaluate_all(self) -> None:
        """Held-out loss (when a split is held out), then the ``eval`` section's VQA metrics (when set)."""
        if self.val_set is not None:
            self.evaluate()  # runs the VQA metrics too
        else:
            self._evaluate_vqa()
            self.last_eval_step = self.step

    def _stand_in(self, dataset: Any, images: bool, what: str) -> dict[str, Any]:
        """A one-sample batch of the given modality, run (and discarded) by a rank whose share was all skipped
        before it had a usable batch of that modality: the first usable sample of that modality."""
        for j in range(len(dataset)):
            if dataset.has_image_at(j) != images:
                continue
            item = dataset[j]
            if not isinstance(item, Skipped):
                return self.collate([item])
        raise RuntimeError(
            f"{what} has no usable sample on rank {self.runner.rank}, and no sample "
            f"{'with' if images else 'without'} an image is usable at all (see the skipped records in the log)"
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted loss on the held-out split (all ranks)."""
        r = self.runner
        sampler = GroupedBatchSampler(
            self.val_set.lengths,
            self.data.batch_size,
            self.val_set.has_image,
            group_by_length=False,
            shuffle=False,
            world_size=r.world_size,
            rank=r.rank,
            drop_last=False,
        )
        # every rank runs the same number of forwards (lock-step); each held-out sample is counted once
        plan = sampler.exact_batches()
        r.model.eval()
        loss_sum, count, fallback = 0.0, 0, {}
        first = self.last_eval_step < 0  # the held-out records skipped are counted once in the run's summary
        loader = self._loader(self.val_set, [indices for indices, _ in plan])
        for i, ((_, counts), batch) in enumerate(zip(plan, loader, strict=True)):
            if self.sched.eval_max_batches and i >= self.sched.eval_max_batches:
                break
            if counts and first:
                for sk in batch["skipped"]:
                    self.skips.add(sk)
            if not batch["num_samples"]:  # every sample of this share was skipped
                if r.world_size == 1:
                    continue
                images = _with_images(batch, self.val_set)
                if images not in fallback:
                    fallback[images] = self._stand_in(self.val_set, images, f"held-out batch {i}")
                batch, counts = fallback[images], False  # the same modules as the other ranks' forward
            loss = float(r.forward(batch).float().cpu())
            if counts:
                fallback[_with_images(batch, self.val_set)] = batch
                loss_sum += loss * batch["num_target_tokens"]
                count += batch["num_target_tokens"]
        r.model.train()
        totals = r.all_reduce(torch.tensor([loss_sum, float(count)]))
        value = float(totals[0] / max(totals[1], 1.0))
        self.logger.log(self.step, {"loss": value}, split="eval")
        self.logger.message(f"step {self.step}: held-out loss {value:.4f}")
        self.history.append({"step": self.step, "eval_loss": value})
        self.last_eval_step = self.step
        self._evaluate_vqa()
        return value

    def _evaluate_vqa(self) -> None:
        """The ``eval`` section's dev-split VQA metrics (greedy answers through the serving engine)."""
        if self.vqa_hook is None:
            return
        model = self.runner.eval_model(self._adapt())  # collective on sharded runners
        if model is not None:  # the main rank
            was_training = model.training
            model.eval()  # no dropout (LoRA's, the LLM's) in the answers; the live model trains again after
            try:
                values = self.vqa_hook(model, self.step, self.logger)
            finally:
                model.train(was_training)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items()))
            self.logger.message(f"step {self.step}: {shown}")
            self.history.append({"step": self.step, **{f"vqa/{k}": v for k, v in values.items()}})
            del model
        self.runner.barrier()  # the other ranks wait for the main one

    def _adapt(self) -> Any:
        """What a rebuilt, unsharded copy of the model needs re-applied (the LoRA adapter), or ``None``."""
        if self.lora is None:
            return None
        from cambrian_core.train.lora import apply_lora

        return partial(apply_lora, settings=self.lora)

    def save(self) -> Path:
        """A complete checkpoint of the current step (atomic; see ``checkpoint``)."""
        r = self.runner
        state = {
            "step": self.step,
            "sampler": self.sampler.state_dict(self.consumed),
            "history": self.history,
            "skipped": dict(self.skips.counts),
            "skip_examples": {k: list(v) for k, v in self.skips.examples.items()},
            "last_eval_step": self.last_eval_step,
        }
        rng = capture_rng()
        cfg_json = json.dumps(
            self.cfg.to_dict() if hasattr(self.cfg, "to_dict") else dict(self.cfg), default=str
        )

        def write(tmp: Path) -> None:
            r.save_state(tmp)
            torch.save(rng, tmp / f"rng_rank{r.rank}.pt")
            if r.is_main:
                torch.save(state, tmp / "state.pt")
                (tmp / "config.json").write_text(cfg_json)

        folder = self.checkpoints.save(self.step, write)
        self.last_checkpoint = folder
        self.logger.message(f"step {self.step}: checkpoint {folder}")
        return folder

    # =============================================================================================== cleanup
    def cleanup(self) -> None:
        self.announce("cleanup: final checkpoint, evaluation, exported model, loss curve")
        if self.last_eval_step != self.step:
            try:
                self._evaluate_all()
            except Exception:
                if self.runner.world_size > 1:  # the other ranks wait in the evaluation's collectives
                    raise
                folder = self.save()  # whatever went wrong in the evaluation, the trained weights are kept
                log.error(
                    "the final evaluation failed; the trained weights are in %s: fix the cause (the `eval` "
                    "section?) and `--resume auto` finishes the run (evaluation, export)",
                    folder,
                )
                raise
        self.save()
        self.exported = self._export()
        self.logger.close()
        if self.runner.is_main:
            if self.logcfg.plot:
                title = f"{self.config_path.stem if self.config_path else 'run'} ({self.cfg.get('stage') or self.model.stage})"
                png = plot_loss_curve(
                    self.work_dir / "metrics.jsonl", self.work_dir / "loss_curve.png", title
                )
                if png:
                    self.announce(f"cleanup: loss curve {png}")
            self.announce(f"cleanup: {self.skips.summary()}")
        self.runner.teardown()

    def _export(self) -> str | None:
        if not self.ckpt.export:
            return None
        from cambrian_core.train.lora import export_lora

        finalize = None
        if self.lora is not None:
            finalize = partial(
                export_lora, settings=self.lora, adapter_dir=str(self.work_dir / "lora_adapter")
            )
        out = self.runner.export(self.work_dir / "model", self._adapt(), finalize)
        if out:
            self.announce(f"cleanup: model saved to {out} (load with cambrian_core.model.io.load_model)")
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "work_dir": str(self.work_dir),
            "step": self.step,
            "losses": [h["loss"] for h in self.history if "loss" in h],
            "eval_losses": [h["eval_loss"] for h in self.history if "eval_loss" in h],
            "skipped": dict(self.skips.counts),
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "model": getattr(self, "exported", None),
        }


def _encode_images(tower: torch.nn.Module, staged: bool, paths: list[Path]) -> torch.Tensor | StagedTokens:
    """Tower features of image files (for the feature cache): tokens, or ``forward_staged``'s stages."""
    from PIL import Image

    from cambrian_core.data.medimage import to_rgb

    pixels = torch.stack([tower.preprocess(to_rgb(Image.open(p))) for p in paths])
    tower_device = next(tower.parameters()).device
    with torch.no_grad():
        out = (tower.forward_staged if staged else tower)(pixels.to(tower_device))
    return out.to(device="cpu", dtype=torch.float32)
