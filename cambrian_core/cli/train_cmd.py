"""``cambrian train CONFIG`` (also ``cambrian-train CONFIG``): run the training recipe.

With ``--launcher torchrun --nproc N`` the command re-executes itself under
``python -m torch.distributed.run --standalone --nproc_per_node N``; with ``--launcher deepspeed`` under the
``deepspeed`` launcher. Multi-node runs use the launchers directly (see docs/training.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

from cambrian_core.cli.argtypes import positive_int

__all__ = ["add_parser", "launch_command", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a config (two-stage recipes, four runners)")
    p.add_argument("config", help="config file (e.g. configs/demo/cambrian_tiny_med_pretrain.py)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|PATH",
        help="continue from the newest complete checkpoint (auto, the default when given alone) or from PATH",
    )
    p.add_argument(
        "--launcher",
        choices=["none", "torchrun", "deepspeed"],
        default="none",
        help="start --nproc processes on this machine (torchrun: runners fsdp/deepspeed; deepspeed: its launcher)",
    )
    p.add_argument(
        "--nproc", type=positive_int, default=1, help="processes per node for --launcher (default 1)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run checks and setup, print the plan, check every sample (no pixels decoded) and name those "
        "training would skip, with file and line; do not train",
    )
    p.add_argument(
        "--check-pixels",
        action="store_true",
        help="with --dry-run: also decode every image, so truncated pixel data is named too (slower)",
    )
    p.set_defaults(func=run)


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The arguments for the re-executed command (launcher removed)."""
    out = [args.config]
    if args.cfg_options:
        out += ["--cfg-options", *args.cfg_options]
    if args.work_dir:
        out += ["--work-dir", args.work_dir]
    if args.resume:
        out += ["--resume", args.resume]
    if args.dry_run:
        out.append("--dry-run")
    if getattr(args, "check_pixels", False):
        out.append("--check-pixels")
    return out


def launch_command(args: argparse.Namespace) -> list[str]:
    """The command line that starts ``args.nproc`` training processes with the chosen launcher."""
    if args.nproc < 1:
        raise SystemExit(f"--nproc must be >= 1, got {args.nproc}")
    inner = ["-m", "cambrian_core.train", *_forwarded(args)]
    if args.launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            *inner,
        ]
    if importlib.util.find_spec("deepspeed") is None:
        raise SystemExit("--launcher deepspeed needs DeepSpeed: pip install 'cambrian[deepspeed]'")
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]  # the `deepspeed` command of this env
    ds_args = [f"--num_gpus={args.nproc}", "--no_local_rank", "--module", "cambrian_core.train"]
    return [*launcher, *ds_args, *_forwarded(args)]


def run(args: argparse.Namespace) -> int:
    if getattr(args, "check_pixels", False) and not args.dry_run:
        print(
            "error: --check-pixels goes with --dry-run (a training run skips and reports such images itself)",
            file=sys.stderr,
        )
        return 2
    if args.launcher == "none" and args.nproc != 1 and "RANK" not in os.environ:
        print(
            f"error: --nproc {args.nproc} starts processes only with a launcher: add --launcher torchrun "
            "(runners fsdp / deepspeed) or --launcher deepspeed, or drop --nproc",
            file=sys.stderr,
        )
        return 2
    if args.launcher != "none" and "RANK" not in os.environ:
        cmd = launch_command(args)
        print("launching: " + " ".join(cmd), file=sys.stderr)
        env = dict(os.environ)
        if args.launcher == "deepspeed":
            env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
        return subprocess.call(cmd, env=env)
    from cambrian_core.config import load_config
    from cambrian_core.train.recipe import TrainRecipe

    cfg = load_config(args.config, args.cfg_options)
    summary = TrainRecipe(
        cfg,
        args.config,
        args.work_dir,
        args.resume,
        args.dry_run,
        check_pixels=getattr(args, "check_pixels", False),
    ).run()
    if int(os.environ.get("RANK", 0)) == 0:
        losses = summary["losses"]
        last = f", last loss {losses[-1]:.4f}" if losses else ""
        print(f"done: {summary['step']} steps{last}; outputs in {summary['work_dir']}")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
