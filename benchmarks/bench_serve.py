"""Serving speed: time to first token and decode tokens/s against Hugging Face ``LlavaForConditionalGeneration``,
and the OpenAI-compatible API's throughput with 1, 4 and 16 concurrent clients.

Part 1 builds, at identical tiny sizes, a Hugging Face LLaVA (CLIP tower, ``mlp2x_gelu`` projector, LLaMA) and our
model with the same three parts (one ``clip`` tower, ``mlp2x_gelu``, ``llama3`` with the same LLaMA config and
the same vocabulary size) and decodes the same number of tokens greedily with each (end tokens suppressed so both
produce exactly ``--new-tokens``). Time to first token and the decode rate come from token timestamps taken by a
streamer, the same way for both, from the PIL image and the chat messages: the same tokenizer and image
transform prepare both inputs, and ours also goes through the serving engine's queue and thread. Medians of
``--repeats`` runs; the ratio is ours / theirs for tokens/s and theirs / ours for the first token (>1 = faster).

Part 2 serves our tiny model on loopback and runs N clients (threads of a separate process, each with its own
HTTP connection) that send streaming chat requests with one image for ``--seconds`` each (bounded). Prints p50 / p95 request latency, tokens/s
and errors per N, and the ratio of each N's tokens/s to one client's.

    python benchmarks/bench_serve.py --new-tokens 64 --repeats 5 --seconds 10
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

#: name -> (LLaMA config, CLIP config, image tokens = (image_size / patch_size) ** 2)
SIZES = {
    "tiny": (
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        },
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        16,
    ),
    "small": (
        {
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
        },
        {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
        64,
    ),
}
MESSAGES = [{"role": "user", "content": "<image>\nWhat is in the image?"}]


class Stamps:
    """A transformers streamer that only records when each new token arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 2 and not self._prompt_seen:  # the prompt ids come first
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((48, 40, 3)) * 255).astype("uint8"))


def ours(size: str = "tiny") -> Any:
    from cambrian_core import MODELS, build

    llama, clip, tokens = SIZES[size]
    torch.manual_seed(0)
    cfg = {
        "type": "cambrian",
        "vision_tower_aux_list": [{"type": "clip", "config": dict(clip), "token_len": tokens}],
        "image_token_len": tokens,
        "connector": {"type": "mlp2x_gelu"},
        "llm": {"type": "llama3", "config": dict(llama)},
    }
    return build(MODELS, cfg).eval()


def theirs(size: str, vocab_size: int, pad_id: int, image_token_id: int) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    llama, clip, tokens = SIZES[size]
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**clip),
        text_config=LlamaConfig(**llama, vocab_size=vocab_size, pad_token_id=pad_id),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",  # drop CLS: the patch tokens only, like our tower
        vision_feature_layer=-2,
        image_seq_length=tokens,
    )
    return LlavaForConditionalGeneration(config).eval()


def hf_inputs(model: Any, engine: Any, image: Image.Image) -> dict[str, torch.Tensor]:
    """The same prompt for LLaVA, prepared with the same tokenizer and image transform as ours (LLaVA's image
    token expanded into its 16 positions)."""
    from cambrian_core.model.tokenize import IMAGE_TOKEN_INDEX

    ids = engine.tokenize_messages(MESSAGES, 1)
    k = ids.index(IMAGE_TOKEN_INDEX)
    expanded = ids[:k] + [model.config.image_token_index] * model.config.image_seq_length + ids[k + 1 :]
    pixels = engine.model.towers[0].preprocess(image)[None]
    return {
        "input_ids": torch.tensor([expanded]),
        "attention_mask": torch.ones(1, len(expanded), dtype=torch.long),
        "pixel_values": pixels,
    }


def timed_hf(model: Any, engine: Any, image: Image.Image, n: int) -> tuple[float, float]:
    """From the PIL image and the messages (the same preparation as ours) to LLaVA's tokens."""
    stamps = Stamps()
    start = time.perf_counter()
    inputs = hf_inputs(model, engine, image)
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            streamer=stamps,
            pad_token_id=model.config.text_config.pad_token_id,
        )
    return _rates(start, stamps.times, n)


def timed_model(engine: Any, image: Image.Image, n: int) -> tuple[float, float]:
    """Our model's own ``generate`` without the serving engine (same preparation), to show what the engine adds."""
    model, stamps = engine.model, Stamps()
    start = time.perf_counter()
    ids = torch.tensor([engine.tokenize_messages(MESSAGES, 1)])
    pixels, sizes = model.prepare_images([image])
    with torch.inference_mode():
        model.generate(
            ids,
            torch.ones_like(ids),
            pixel_values=pixels,
            image_sizes=sizes,
            max_new_tokens=n,
            min_new_tokens=n,
            streamer=stamps,
        )
    return _rates(start, stamps.times, n)


def timed_engine(engine: Any, image: Image.Image, n: int) -> tuple[float, float]:
    from cambrian_core.serve.engine import SamplingParams

    start = time.perf_counter()
    handle = engine.submit_chat(
        [{"role": "user", "content": "<image>\nWhat is in the image?"}],
        [image],
        SamplingParams(max_new_tokens=n, min_tokens=n),
    )
    queued = time.perf_counter() - start  # tokenising the messages, before the request exists
    res = handle.wait(timeout=120)
    assert res.completion_tokens == n, res
    # text deltas are not tokens: the engine stamps the first token and the end itself (from submission)
    return queued + res.time_to_first_token, (n - 1) / max(res.duration - res.time_to_first_token, 1e-9)


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _rates(start: float, times: list[float], n: int) -> tuple[float, float]:
    assert len(times) == n, f"expected {n} token stamps, got {len(times)}"
    return times[0] - start, (n - 1) / max(times[-1] - times[0], 1e-9)


def part1(args: argparse.Namespace, size: str) -> None:
    from cambrian_core.serve.engine import InferenceEngine

    model = ours(size)
    engine = InferenceEngine(model, name="tiny", max_batch_size=1, batch_wait=0.0)
    tok = model.llm.tokenizer
    vocab = model.llm.model.config.vocab_size
    prompt = engine.tokenize_messages(MESSAGES, 1)
    spare = max(set(range(vocab)) - set(prompt))  # LLaVA's image token: any id the prompt does not use
    hf = theirs(size, vocab, int(tok.pad_token_id), spare)
    sizes = {
        "LLM": (_count(model.llm), _count(hf.model.language_model) + _count(hf.lm_head)),
        "tower": (_count(model.towers), _count(hf.model.vision_tower)),
        "projector": (_count(model.connector), _count(hf.model.multi_modal_projector)),
    }
    image = picture()
    n = args.new_tokens
    for _ in range(2):  # warm-up
        timed_hf(hf, engine, image, n)
        timed_model(engine, image, n)
        timed_engine(engine, image, n)
    rows = {"hf": [], "model": [], "ours": []}
    for _ in range(args.repeats):  # interleaved so background load hits all alike
        rows["hf"].append(timed_hf(hf, engine, image, n))
        rows["model"].append(timed_model(engine, image, n))
        rows["ours"].append(timed_engine(engine, image, n))
    engine.shutdown()
    print(
        f"== {size}: single request, {n} new tokens, batch 1, {args.repeats} interleaved runs "
        f"(torch threads: {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f})"
    )
    print("   parameters (ours / HF): " + ", ".join(f"{k} {a:,} / {b:,}" for k, (a, b) in sizes.items()))
    print(f"{'':<34}{'TTFT ms':>9}{'(best)':>8}{'decode tok/s':>14}{'(best)':>8}")
    stats = {}
    labels = (
        ("hf", "HF LlavaForConditionalGeneration"),
        ("model", "cambrian model.generate"),
        ("ours", "cambrian serving engine"),
    )
    for key, label in labels:
        ttft, rate = [t for t, _ in rows[key]], [r for _, r in rows[key]]
        stats[key] = (statistics.median(ttft), min(ttft), statistics.median(rate), max(rate))
        m_t, b_t, m_r, b_r = stats[key]
        print(f"{label:<34}{m_t * 1e3:>9.2f}{b_t * 1e3:>8.2f}{m_r:>14.1f}{b_r:>8.1f}")
    h, o = stats["hf"], stats["ours"]
    print(
        f"ratio ours vs HF (>= 1.0 = at least as fast): TTFT {h[0] / o[0]:.2f}x median, {h[1] / o[1]:.2f}x best; "
        f"decode {o[2] / h[2]:.2f}x median, {o[3] / h[3]:.2f}x best"
    )


def _client(
    url: str, body: dict[str, Any], deadline: float, out: list[tuple[float, int, str | None]]
) -> None:
    import httpx

    with httpx.Client(timeout=120) as http:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            tokens, error = 0, None
            try:
                with http.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        error = f"HTTP {r.status_code}"
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            data = json.loads(line[6:])
                            if "error" in data:
                                error = data["error"]["message"]
                            elif data.get("usage"):
                                tokens = data["usage"]["completion_tokens"]
            except Exception as exc:  # counted, not raised: the load test reports errors
                error = f"{type(exc).__name__}: {exc}"
            out.append((time.perf_counter() - start, tokens, error))


def _clients(url: str, body: dict[str, Any], n: int, seconds: float, conn: Any) -> None:
    """In a process of its own: ``n`` client threads for ``seconds``; sends back (results, wall seconds)."""
    results: list[tuple[float, int, str | None]] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(url, body, start + seconds, results)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    conn.send((results, time.perf_counter() - start))
    conn.close()


def _load(
    url: str, body: dict[str, Any], n: int, seconds: float
) -> tuple[list[tuple[float, int, str | None]], float]:
    """Run the clients in a separate process, as real clients are: their HTTP and JSON work does not compete
    with the server for its interpreter lock (it still shares the machine's cores)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_clients, args=(url, body, n, seconds, child), daemon=True)
    proc.start()
    child.close()
    results, wall = parent.recv()
    proc.join(30)
    return results, wall


def part2(args: argparse.Namespace) -> None:
    from cambrian_core.serve.engine import InferenceEngine
    from cambrian_core.serve.openai_api import create_app
    from cambrian_core.serve.server import BackgroundServer

    engine = InferenceEngine(ours(), name="tiny", max_batch_size=max(args.clients), batch_wait=0.002)
    buf = io.BytesIO()
    picture(1).save(buf, format="PNG")
    url_image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "model": "tiny",
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": args.api_tokens,
        "min_tokens": args.api_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url_image}},
                    {"type": "text", "text": "What is in the image?"},
                ],
            }
        ],
    }
    print(
        f"\n== OpenAI API on loopback, streaming, {args.api_tokens} tokens per answer, {args.seconds:.0f} s per run"
    )
    print(
        f"{'clients':>8}{'requests':>10}{'errors':>8}{'p50 ms':>10}{'p95 ms':>10}{'tokens/s':>11}{'vs 1':>7}"
    )
    base = None
    with BackgroundServer(create_app(engine)) as srv:
        url = srv.url + "/v1/chat/completions"
        _client(url, body, time.perf_counter() + 1.0, [])  # warm-up
        for n in args.clients:
            results, wall = _load(url, body, n, args.seconds)
            ok = [r for r in results if r[2] is None]
            lat = sorted(r[0] for r in ok)
            rate = sum(r[1] for r in ok) / wall
            base = base or rate
            p50 = lat[len(lat) // 2] * 1e3 if lat else float("nan")
            p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1e3 if lat else float("nan")
            print(
                f"{n:>8}{len(results):>10}{len(results) - len(ok):>8}{p50:>10.1f}{p95:>10.1f}{rate:>11.1f}"
                f"{rate / base:>6.2f}x"
            )
            for r in results:
                if r[2] is not None:
                    print(f"   error: {r[2]}")
                    break
    engine.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--api-tokens", type=int, default=32)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--skip-api", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: tiny models gain nothing from more, and on a shared "
        "machine several threads make timings erratic)",
    )
    args = p.parse_args()
    from cambrian_core.cpu_allocator import tune_cpu_allocator

    # as the cambrian commands do (both sides of every comparison run in this process)
    print(f"allocator: {'heap-only glibc malloc' if tune_cpu_allocator() else 'system defaults'}")
    torch.set_num_threads(args.threads)
    for size in args.sizes:
        part1(args, size)
    if not args.skip_api:
        part2(args)


if __name__ == "__main__":
    main()
