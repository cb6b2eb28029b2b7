"""``cambrian eval BENCH --data DIR --model PATH_OR_NAME``: medical VQA evaluation (see ``cambrian_core.eval``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cambrian_core.cli.argtypes import nonneg_int, positive_int
from cambrian_core.serve.flags import placement_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model on VQA-RAD, SLAKE, PathVQA, PMC-VQA or a private JSONL set",
        description=(
            "Greedy answers through the serving engine (sharded, resumable), strict and LLaVA-Med / PMC-VQA "
            "compatible metrics with bootstrap intervals, optional LLM judge; writes results.json, results.md, "
            "results.png and errors.jsonl. `cambrian eval list` shows benchmarks and metrics."
        ),
    )
    p.add_argument(
        "benchmark", metavar="BENCH", help="vqa_rad, slake, slake_zh, pathvqa, pmc_vqa, jsonl (or `list`)"
    )
    p.add_argument(
        "--data", help="the benchmark's release folder (jsonl: a file or a folder of <split>.jsonl)"
    )
    p.add_argument("--model", help="saved model folder or registered checkpoint name (cambrian models list)")
    p.add_argument(
        "--split", help="split to evaluate (default: the benchmark's test split; pmc_vqa: test_clean)"
    )
    p.add_argument("--out", help="results folder (default: eval_results/<bench>-<split>/<model>)")
    p.add_argument("--limit", type=positive_int, help="only the first N questions")
    p.add_argument("--shard", help="i/n: answer every n-th question starting at i (one process per GPU)")
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="questions decoded together (default 8)"
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="answer length budget (default 64)"
    )
    p.add_argument(
        "--prompt", default="short", help="question prompt style[.version]: short (default) or plain"
    )
    placement_arguments(p)  # --device, --dtype, --tower-path
    p.add_argument("--layout", help="vqa_rad: osf, mevf or auto")
    p.add_argument("--image-dir", help="pmc_vqa / jsonl: image folder, if not the default")
    p.add_argument("--metrics", help="comma-separated metric names (default: all that apply)")
    p.add_argument(
        "--bootstrap",
        type=nonneg_int,
        default=1000,
        help="bootstrap resamples for the intervals (default 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--worst", type=nonneg_int, default=50, help="items in errors.jsonl (default 50)")
    p.add_argument("--judge-model", help="grade answers with this LLM (OpenAI-compatible chat completions)")
    p.add_argument("--judge-base-url", help="judge endpoint (default: $OPENAI_BASE_URL, else api.openai.com)")
    p.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the judge's API key",
    )
    p.add_argument("--judge-prompt", help="judge prompt version (default: newest)")
    p.add_argument(
        "--judge-on", default="open", choices=["open", "all"], help="items to grade (default: open)"
    )
    p.add_argument("--judge-concurrency", type=int, default=4, help="judge requests in flight (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _list() -> int:
    from cambrian_core.eval.loaders import BENCHMARKS
    from cambrian_core.eval.scoring import build_metrics

    print("benchmarks:")
    for b in BENCHMARKS.values():
        opts = ", ".join(b.options()) or "-"
        print(
            f"  {b.name:<9} splits {', '.join(b.splits)} (default {b.default_split}); options: {opts}; {b.description}"
        )
    print("metrics:")
    for m in build_metrics():
        print(f"  {m.name:<25} [{m.family}, {m.kind}] {m.description}")
    return 0


def _options(bench: Any, args: argparse.Namespace) -> dict[str, Any]:
    given = {"layout": args.layout, "image_dir": args.image_dir}
    if bench.name == "jsonl" and args.image_dir:
        given = {"layout": args.layout, "image_folder": args.image_dir}
    opts = {k: v for k, v in given.items() if v is not None}
    bad = [k for k in opts if k not in bench.options()]
    if bad:
        raise ValueError(f"{bench.name} does not take --{bad[0].replace('_', '-')}")
    return opts


def _model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """How ``--model`` is loaded, pinned in ``run.json`` with it: the ``--dtype`` flag, ``--load-8bit`` /
    ``--load-4bit``, the ``--tower-path`` folders and a fingerprint of the weight files (model folder and towers)."""
    from cambrian_core.eval.runner import weights_fingerprint
    from cambrian_core.serve.loading import parse_tower_paths

    towers = parse_tower_paths(args.tower_path)
    return {
        "dtype": (args.dtype or "auto").strip().lower(),
        "quantize": f"{args.quantize}bit" if args.quantize else "none",
        "tower_paths": dict(sorted(towers.items())),
        "weights": weights_fingerprint(args.model, *towers.values()),
    }


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "list":
        return _list()
    from cambrian_core.data.generators.chat_client import ChatAPIError
    from cambrian_core.eval.judge import JudgeError

    try:
        return _run(args)
    except (JudgeError, ChatAPIError, ValueError) as exc:  # layout, settings and argument problems included
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from cambrian_core.eval.judge import Judge
    from cambrian_core.eval.loaders import benchmark, load_benchmark
    from cambrian_core.eval.pipeline import evaluate
    from cambrian_core.eval.runner import EnginePredictor, parse_shard
    from cambrian_core.serve.loading import model_display_name

    if not args.data or not args.model:
        raise ValueError("cambrian eval needs --data and --model")
    bench = benchmark(args.benchmark)
    shard = parse_shard(args.shard)
    evalset = load_benchmark(bench.name, args.data, args.split, **_options(bench, args)).limit(args.limit)
    name = model_display_name(args.model)
    out = Path(args.out) if args.out else Path("eval_results") / f"{evalset.benchmark}-{evalset.split}" / name
    print(f"{evalset.benchmark}/{evalset.split}: {len(evalset)} questions from {args.data}; results in {out}")
    engines: list[Any] = []

    def predictor() -> EnginePredictor:
        from cambrian_core.serve.engine import InferenceEngine
        from cambrian_core.serve.loading import load_for_serving

        model = load_for_serving(args.model, args.device, args.dtype, args.tower_path, args.quantize)
        engine = InferenceEngine(
            model, name=name, max_batch_size=args.batch_size, batch_wait=0.01, max_queue=4096
        )
        engines.append(engine)
        return EnginePredictor(engine, args.max_new_tokens)

    judge = None
    if args.judge_model:
        judge = Judge(
            args.judge_model,
            base_url=args.judge_base_url,
            api_key=os.environ.get(args.judge_api_key_env) or None,
            prompt_version=args.judge_prompt,
            max_concurrency=args.judge_concurrency,
        )
    try:
        outcome = evaluate(
            evalset,
            predictor,
            out,
            model=str(args.model),
            model_settings=_model_settings(args),
            shard=shard,
            batch_size=args.batch_size,
            prompt_style=args.prompt,
            max_new_tokens=args.max_new_tokens,
            metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
            judge=judge,
            judge_kinds=("open",) if args.judge_on == "open" else ("open", "closed", "choice"),
            n_boot=args.bootstrap,
            seed=args.seed,
            worst=args.worst,
            progress=not args.no_progress,
        )
    finally:
        for engine in engines:
            engine.shutdown()
        if judge is not None:
            judge.close()
    gen = outcome.generation
    if gen is not None:
        print(
            f"generated {gen.generated}, failed {gen.failed}, already done {gen.skipped} ({gen.seconds:.1f} s)"
        )
        for line in gen.errors[:5]:
            print(f"  failed: {line}")
    if outcome.status == "incomplete":
        print(
            f"{outcome.missing} questions still lack answers (other shards); rerun once they finish to score"
        )
        return 0
    for m in outcome.metrics.values():
        print(
            f"  {m['label']:<40} {100 * m['value']:6.2f}  [{100 * m['ci'][0]:.2f}, {100 * m['ci'][1]:.2f}]  n={m['n']}"
        )
    if outcome.judge and outcome.judge.get("axes"):
        overall = outcome.judge["axes"]["overall"]
        print(f"  judge {outcome.judge['model']} overall {overall['value']:.2f}/5  n={overall['n']}")
    for kind, path in outcome.paths.items():
        print(f"{kind}: {path}")
    return 0
