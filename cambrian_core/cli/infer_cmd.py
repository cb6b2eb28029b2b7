"""``cambrian infer``: answer a prompt about images (PNG / JPEG / DICOM / NIfTI), streamed to the terminal.

Three modes: one ``--prompt`` (streams the answer), no prompt (an interactive chat; the images attach to the first
turn), or ``--batch FILE.jsonl`` (one JSON result per input line, appended to ``--output`` as each finishes, so an
interrupted run resumes where it stopped; lines that failed are tried again).

Batch lines: ``{"id": "a1", "image": "scan.dcm" | ["a.png", "b.png"], "prompt": "...", "window": "lung",
"slice_axis": "axial", "slice_index": 40, "max_new_tokens": 128, "temperature": 0}`` (only ``prompt`` is required;
relative image paths are relative to the JSONL file; ``id`` defaults to ``line-<n>``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from cambrian_core.data.windowing import PRESETS
from cambrian_core.fileio import jsonl_lines
from cambrian_core.serve.flags import placement_arguments

__all__ = ["add_parser", "done_ids", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="answer a prompt about images (streamed), or a JSONL batch of prompts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        "--model-path",
        dest="model",
        required=True,
        help="saved model folder, registered checkpoint name, or Cambrian-1 HF folder",
    )
    p.add_argument(
        "--image",
        "--image-file",
        dest="image",
        nargs="+",
        default=[],
        metavar="FILE",
        help="PNG / JPEG / DICOM (file or series folder) / NIfTI images, in prompt order",
    )
    p.add_argument(
        "--prompt", help="the question; without it (and without --batch) an interactive chat starts"
    )
    p.add_argument(
        "--batch",
        metavar="FILE.jsonl",
        help="answer every line of a JSONL file (a rerun skips answered lines and retries failed ones)",
    )
    p.add_argument("--output", metavar="OUT.jsonl", help="batch results (default: <batch>.results.jsonl)")
    p.add_argument(
        "--window",
        help=f"window for CT/MR: a preset ({', '.join(PRESETS)}), auto, tags, minmax, percentile, or CENTER,WIDTH",
    )
    p.add_argument("--slice-axis", choices=["axial", "coronal", "sagittal"], help="slice plane of a volume")
    p.add_argument("--slice-index", type=int, help="slice of a volume (default: the middle one)")
    p.add_argument("--frame", type=int, help="frame of a multi-frame DICOM")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages tokens already in the prompt or answer (HF / vLLM semantics; 1 = off, e.g. 1.2)",
    )
    placement_arguments(p)
    p.add_argument("--max-batch-size", type=int, default=8, help="batch mode: prompts decoded together")
    p.set_defaults(func=run)


def _scan_options(record: dict[str, Any], args: argparse.Namespace) -> Any:
    """The scan options of a batch line (or the flags); a window that is no preset, mode or pair is refused
    whatever the image (a PNG ignores it, but the request is wrong)."""
    from cambrian_core.data.windowing import resolve_window
    from cambrian_core.serve.errors import RequestError
    from cambrian_core.serve.images import ScanOptions

    def pick(key: str) -> Any:
        return record.get(key, getattr(args, key))

    if pick("window") is not None:
        try:
            resolve_window(pick("window"))
        except ValueError as exc:
            raise RequestError(f"window {pick('window')!r}: {exc}", code="invalid_image_options") from None
    return ScanOptions(
        window=pick("window"),
        slice_axis=pick("slice_axis"),
        slice_index=pick("slice_index"),
        frame=pick("frame"),
    )


def _load_images(paths: list[str], options: Any) -> list[Any]:
    from cambrian_core.serve.images import ImageLimits, image_from_file

    limits = ImageLimits(
        max_images=64, max_bytes=2**40, max_pixels=2**40
    )  # local files: the user's own choice
    return [image_from_file(p, options=options, limits=limits) for p in paths]


def _params(record: dict[str, Any], args: argparse.Namespace) -> Any:
    from cambrian_core.serve.engine import SamplingParams

    return SamplingParams(
        max_new_tokens=int(record.get("max_new_tokens", args.max_new_tokens)),
        temperature=float(record.get("temperature", args.temperature)),
        top_p=float(record.get("top_p", args.top_p)),
        repetition_penalty=float(record.get("repetition_penalty", args.repetition_penalty)),
    )


def _engine(args: argparse.Namespace) -> Any:
    from cambrian_core.serve.engine import InferenceEngine
    from cambrian_core.serve.loading import load_for_serving, model_display_name

    model = load_for_serving(args.model, args.device, args.dtype, args.tower_path, args.quantize)
    return InferenceEngine(
        model, name=model_display_name(args.model), max_batch_size=args.max_batch_size, max_images=64
    )


def run(args: argparse.Namespace) -> int:
    from cambrian_core.serve.errors import RequestError

    if args.batch and (args.prompt or args.image):
        print(
            "error: --batch takes its prompts and images from the file; drop --prompt / --image",
            file=sys.stderr,
        )
        return 2
    try:
        images = _load_images(args.image, _scan_options({}, args)) if args.image else []
        engine = _engine(args)
    except (RequestError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    try:
        if args.batch:
            return run_batch(engine, args)
        if args.prompt is not None:
            return _answer(engine, [{"role": "user", "content": args.prompt}], images, args, sys.stdout)[0]
        return _chat(engine, images, args)
    except RequestError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()


def _answer(
    engine: Any, messages: list[dict[str, str]], images: list[Any], args: argparse.Namespace, out: TextIO
) -> tuple[int, str]:
    from cambrian_core.serve.engine import add_image_markers

    if images and messages and messages[0]["role"] == "user":
        messages = [
            {"role": "user", "content": add_image_markers(messages[0]["content"], len(images))},
            *messages[1:],
        ]
    handle = engine.submit_chat(messages, images, _params({}, args))
    for delta in handle:
        out.write(delta)
        out.flush()
    out.write("\n")
    return 0, handle.result.text


def _chat(engine: Any, images: list[Any], args: argparse.Namespace) -> int:
    history: list[dict[str, str]] = []
    print(
        f"chatting with {engine.name} ({len(images)} image(s)); an empty line or Ctrl-D ends", file=sys.stderr
    )
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        print("ASSISTANT: ", end="", flush=True)
        _, text = _answer(engine, history, images, args, sys.stdout)
        history.append({"role": "assistant", "content": text})
    return 0


def done_ids(path: Path) -> set[str]:
    """Ids already answered in a results file. A cut-off last line (a crash mid-write) is removed, and so are
    the lines of requests that failed (a bad image, an out-of-memory error): a rerun tries those again. The file
    is rewritten atomically when anything is dropped."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    lines = data.decode().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    rows = [(line, json.loads(line)) for line in lines if line.strip()]
    kept = [line for line, row in rows if "error" not in row]
    if "".join(kept).encode() != data:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        failed = sum("error" in row for _, row in rows)
        if failed:
            print(f"retrying {failed} line(s) that failed last time", file=sys.stderr)
    return {row["id"] for _, row in rows if "error" not in row}


def _records(path: Path) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """``(id, record, problem)`` per non-empty line."""
    out, seen = [], set()
    for n, line in enumerate(jsonl_lines(path.read_text()), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError("each line needs a string `prompt`")
        except ValueError as exc:
            out.append((f"line-{n}", None, f"line {n}: {exc}"))
            continue
        rid = str(rec.get("id", f"line-{n}"))
        if rid in seen:
            raise SystemExit(f"error: {path}: line {n} repeats the id {rid!r}; ids must be unique")
        seen.add(rid)
        out.append((rid, rec, None))
    return out


def run_batch(engine: Any, args: argparse.Namespace) -> int:
    """Answer every line of ``args.batch``; append one JSON result per line to the output as each finishes."""
    from cambrian_core.serve.engine import add_image_markers
    from cambrian_core.serve.errors import RequestError

    src = Path(args.batch)
    if not src.is_file():
        raise FileNotFoundError(f"--batch {src}: no such file")
    dst = Path(args.output or src.with_suffix("").as_posix() + ".results.jsonl")
    finished = done_ids(dst)
    todo = [r for r in _records(src) if r[0] not in finished]
    print(f"{len(finished)} already answered in {dst}, {len(todo)} to go", file=sys.stderr)
    in_flight: collections.deque[tuple[str, dict[str, Any], Any]] = collections.deque()
    errors = 0

    def write(row: dict[str, Any]) -> None:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def drain(limit: int) -> None:
        nonlocal errors
        while len(in_flight) > limit:
            rid, rec, handle = in_flight.popleft()
            try:
                res = handle.wait()
                write(
                    {
                        "id": rid,
                        "prompt": rec["prompt"],
                        "image": rec.get("image"),
                        "answer": res.text,
                        "finish_reason": res.finish_reason,
                        "prompt_tokens": res.prompt_tokens,
                        "completion_tokens": res.completion_tokens,
                    }
                )
            except Exception as exc:
                errors += 1
                write({"id": rid, "error": f"{type(exc).__name__}: {exc}"})

    with open(dst, "a", encoding="utf-8") as f:
        for rid, rec, problem in todo:
            if rec is None:
                errors += 1
                write({"id": rid, "error": problem})
                continue
            try:
                paths = rec.get("image") or []
                paths = [paths] if isinstance(paths, str) else list(paths)
                paths = [p if os.path.isabs(p) else str(src.parent / p) for p in paths]
                images = _load_images(paths, _scan_options(rec, args))
                prompt = add_image_markers(rec["prompt"], len(images))
                handle = engine.submit_chat([{"role": "user", "content": prompt}], images, _params(rec, args))
            except (RequestError, ValueError, TypeError) as exc:
                errors += 1
                write({"id": rid, "error": getattr(exc, "message", str(exc))})
                continue
            in_flight.append((rid, rec, handle))
            drain(2 * engine.max_batch_size)
        drain(0)
    print(f"wrote {len(todo)} result(s) to {dst} ({errors} error(s))", file=sys.stderr)
    return 1 if errors else 0
