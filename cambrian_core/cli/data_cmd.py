"""``cambrian data filter|mix|show``: clean converted record sets, mix them into a training set, look at them."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from cambrian_core.cli.argtypes import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="filter, mix and inspect LLaVA-format record sets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")

    f = dsub.add_parser(
        "filter",
        help="drop invalid, low-quality, non-medical and duplicate records",
        description="Filter record files (JSONL or JSON arrays) into OUT; every dropped record goes to the rejects "
        "file with its rule and reason.",
    )
    f.add_argument(
        "inputs", nargs="+", metavar="IN", help="record files (e.g. OUT/records.jsonl of a convert run)"
    )
    f.add_argument("--out", required=True, help="filtered JSONL to write")
    f.add_argument("--rejects", default=None, help="rejects JSONL (default: <out stem>.rejects.jsonl)")
    f.add_argument(
        "--min-caption-words", type=int, default=5, help="shortest caption answer kept (default 5)"
    )
    f.add_argument("--max-caption-words", type=int, default=None, help="longest caption answer kept")
    f.add_argument(
        "--min-image-size", type=int, default=32, help="smallest width/height in pixels (default 32)"
    )
    f.add_argument("--blank-std", type=float, default=2.0, help="pixel std below which an image is blank")
    f.add_argument(
        "--no-image-check", action="store_true", help="do not open images (dedup still reads them)"
    )
    f.add_argument("--dedup", choices=("phash", "exact", "none"), default="phash", help="duplicate detection")
    f.add_argument(
        "--phash-distance", type=int, default=4, help="max pHash Hamming distance of near duplicates"
    )
    f.add_argument(
        "--dedup-scope", choices=("stage", "all"), default="stage", help="compare within a stage or all"
    )
    f.add_argument(
        "--domain",
        default=None,
        metavar="MODULE:FUNC",
        help="medical-domain check record -> (keep, reason); default: keyword/modality heuristic",
    )
    f.add_argument("--no-domain", action="store_true", help="skip the medical-domain check")
    f.add_argument(
        "--domain-sources",
        default=None,
        metavar="A,B|all",
        help="sources the domain check applies to (default: pmc_oa,llava and records without provenance)",
    )
    f.set_defaults(func=run_filter)

    m = dsub.add_parser(
        "mix",
        help="combine record sets with ratios into one training file + manifest",
        description="Without --total, RATIO is the share of each source to take (0.5 = half, 2 = twice, needs "
        "--replace); with --total N, ratios are relative weights of an N-record mix.",
    )
    m.add_argument(
        "--input", action="append", required=True, metavar="NAME=PATH[:RATIO]", help="a source (repeat)"
    )
    m.add_argument("--out", required=True, help="mix JSONL to write (manifest: <out stem>.manifest.json)")
    m.add_argument("--total", type=int, default=None, help="records in the mix")
    m.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    m.add_argument("--replace", action="store_true", help="sample with replacement (allows upsampling)")
    m.add_argument(
        "--stage", choices=("caption", "instruct"), default=None, help="only records of this stage"
    )
    m.set_defaults(func=run_mix)

    s = dsub.add_parser("show", help="print records and render an image grid PNG")
    s.add_argument("file", metavar="FILE", help="record file (JSONL or JSON array)")
    s.add_argument("--n", type=positive_int, default=8, help="how many records (default 8)")
    s.add_argument(
        "--stage", choices=("caption", "instruct"), default=None, help="only records of this stage"
    )
    s.add_argument("--grid", default=None, metavar="PNG", help="write an image grid with captions here")
    s.add_argument("--cols", type=positive_int, default=4, help="grid columns (default 4)")
    s.add_argument("--image-root", default=None, help="folder image paths are relative to (default: FILE's)")
    s.set_defaults(func=run_show)
    p.set_defaults(func=lambda a: p.print_help() or 0)


def run_filter(args: argparse.Namespace) -> int:
    from cambrian_core.data.filters import (
        DEFAULT_DOMAIN_SOURCES,
        RecordFilter,
        default_domain_check,
        filter_files,
    )

    if args.domain_sources is None:
        sources: Any = DEFAULT_DOMAIN_SOURCES
    elif args.domain_sources == "all":
        sources = None
    else:
        sources = [s.strip() for s in args.domain_sources.split(",") if s.strip()]
    domain: Any = None if args.no_domain else (args.domain or default_domain_check)
    try:
        flt = RecordFilter(
            min_caption_words=args.min_caption_words,
            max_caption_words=args.max_caption_words,
            check_images=not args.no_image_check,
            min_image_size=args.min_image_size,
            blank_std=args.blank_std,
            dedup=args.dedup,
            phash_distance=args.phash_distance,
            dedup_scope=args.dedup_scope,
            domain=domain,
            domain_sources=sources,
        )
        stats = filter_files(args.inputs, args.out, args.rejects, flt)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, **stats.as_dict()}, indent=2))
    return 0


def run_mix(args: argparse.Namespace) -> int:
    from cambrian_core.data.mix import MixError, mix, parse_mix_input

    try:
        inputs = [parse_mix_input(spec) for spec in args.input]
        manifest = mix(
            inputs, args.out, total=args.total, seed=args.seed, replace=args.replace, stage=args.stage
        )
    except (MixError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['total']} records to {args.out} ({json.dumps(manifest['by_stage'])})")
    for name, src in manifest["sources"].items():
        print(f"  {name:<16} {src['selected']:>8} of {src['available']:<8} {json.dumps(src['by_stage'])}")
        if src.get("unreadable_lines"):
            print(
                f"  warning: {name}: {src['unreadable_lines']} unreadable line(s) skipped (not JSON objects); "
                "`cambrian data filter` lists them with their line numbers",
                file=sys.stderr,
            )
    return 0


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_show(args: argparse.Namespace) -> int:
    from cambrian_core.data.records import iter_records, record_images

    shown: list[dict[str, Any]] = []
    for line, rec in iter_records(args.file):
        if len(shown) >= args.n:
            break
        if isinstance(rec, str):
            print(f"[{line}] unreadable: {rec}")
            continue
        if args.stage and rec.get("stage") != args.stage:
            continue
        shown.append(rec)
        prov = rec.get("provenance") or {}
        print(
            f"── {rec.get('id')}  stage={rec.get('stage')}  source={prov.get('source')}  "
            f"generator={prov.get('generator')}  prompt={prov.get('prompt_version')}"
        )
        for path in record_images(rec):
            print(f"   image: {path}")
        for turn in rec.get("conversations") or []:
            if isinstance(turn, dict):
                print(f"   {turn.get('from', '?'):>5}: {_short(turn.get('value', ''), 200)}")
    if args.grid:
        root = Path(args.image_root) if args.image_root else Path(args.file).parent
        if not root.is_dir():
            print(f"error: --image-root {root} is not a folder", file=sys.stderr)
            return 2
        render_grid(shown, root, Path(args.grid), cols=args.cols)
        print(f"grid of {len(shown)} record(s) written to {args.grid}")
    return 0


def _answer(rec: dict[str, Any]) -> str:
    conv = [t for t in rec.get("conversations") or [] if isinstance(t, dict)]
    answer = next((t.get("value", "") for t in conv if t.get("from") == "gpt"), "")
    return f"[{rec.get('stage')}] {answer}"


def render_grid(records: list[dict[str, Any]], root: Path, out: Path, cols: int = 4, cell: int = 256) -> None:
    """A PNG grid: per record its image(s) tiled in a ``cell``-pixel square, the first answer wrapped below."""
    from PIL import Image, ImageDraw, ImageFont

    from cambrian_core.data.records import record_images

    font = ImageFont.load_default(size=12)
    text_h, pad = 96, 6
    cols = max(1, min(cols, len(records) or 1))
    rows = max(1, -(-len(records) // cols))
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for n, rec in enumerate(records):
        x0, y0 = pad + (n % cols) * (cell + pad), pad + (n // cols) * (cell + text_h + pad)
        paths = record_images(rec) or [None]
        width = cell // len(paths)
        for i, p in enumerate(paths):
            box = (x0 + i * width, y0, x0 + (i + 1) * width, y0 + cell)
            try:
                if p is None:
                    raise FileNotFoundError("text-only record")
                with Image.open(root / p if not Path(p).is_absolute() else p) as im:
                    thumb = im.convert("RGB")
                scale = min(width / thumb.width, cell / thumb.height)  # small images are enlarged too
                thumb = thumb.resize(
                    (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
                )
                sheet.paste(thumb, (box[0] + (width - thumb.width) // 2, y0 + (cell - thumb.height) // 2))
            except (OSError, ValueError) as exc:
                draw.rectangle(box, fill=(220, 220, 220))
                draw.text((box[0] + 4, y0 + 4), _short(f"no image: {exc}", 40), fill="black", font=font)
        lines = textwrap.wrap(_short(f"{rec.get('id')}: {_answer(rec)}", 400), width=cell // 7)[:6]
        draw.multiline_text((x0, y0 + cell + 2), "\n".join(lines), fill="black", font=font, spacing=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
