"""The inference engine: batching equals sequential decoding, per-request stops and budgets, cancellation,
limits; and the image intake (sniffing, base64, size limits, DICOM / NIfTI bytes)."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import ct_small, data_url, image, png_bytes, save_tiny_model

from cambrian_core.serve.engine import InferenceEngine, SamplingParams
from cambrian_core.serve.errors import RequestError
from cambrian_core.serve.images import (
    ImageLimits,
    ScanOptions,
    decode_base64,
    image_from_bytes,
    image_from_url,
    sniff_kind,
)
from cambrian_core.serve.request import Request


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from cambrian_core.model.io import load_model

    return load_model(save_tiny_model(tmp_path_factory.mktemp("engine") / "tiny-e", seed=2))


@pytest.fixture(scope="module")
def engine(model):
    eng = InferenceEngine(model, name="tiny-e", max_batch_size=8, batch_wait=0.01, max_images=3)
    yield eng
    eng.shutdown()


QUESTIONS = ["What is in the image?", "Is there a fracture?", "Describe the findings.", "left or right?"]


def stop_from(text: str, start: int, width: int = 2) -> str:
    """A stop string taken from ``text`` at or after ``start`` (printable, no replacement character)."""
    for i in range(start, len(text) - width):
        piece = text[i : i + width]
        if piece.strip() and "\ufffd" not in piece:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_batched_requests_equal_one_at_a_time(model, engine):
    solo = InferenceEngine(model, name="solo", max_batch_size=1)
    try:
        jobs = [(q, [image(30 + 9 * k, 40, seed=k)] if k % 2 == 0 else []) for k, q in enumerate(QUESTIONS)]
        one = [solo.generate(q, imgs, max_new_tokens=12, min_tokens=12).text for q, imgs in jobs]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            many = list(
                pool.map(lambda j: engine.generate(j[0], j[1], max_new_tokens=12, min_tokens=12).text, jobs)
            )
        assert many == one
        assert len(set(one)) == len(one)  # the requests really differ
    finally:
        solo.shutdown()


def no_end(engine) -> dict[int, float]:
    """A logit bias that keeps the tiny random model from ending (min_tokens would hold back stop strings too)."""
    return {t: -100.0 for t in engine.stop_token_ids}


def test_requests_with_different_budgets_and_stops_share_a_batch(engine):
    full = engine.generate("Describe the findings.", max_new_tokens=16, logit_bias=no_end(engine))
    assert full.completion_tokens == 16 and full.finish_reason == "length"
    stop = stop_from(full.text, 6)
    keep = no_end(engine)
    handles = [
        engine.submit_chat("Describe the findings.", [], SamplingParams(max_new_tokens=16, logit_bias=keep)),
        engine.submit_chat("Describe the findings.", [], SamplingParams(max_new_tokens=4, logit_bias=keep)),
        engine.submit_chat(
            "Describe the findings.", [], SamplingParams(max_new_tokens=16, logit_bias=keep, stop=(stop,))
        ),
    ]
    a, b, c = (h.wait(timeout=60) for h in handles)
    assert a.text == full.text
    assert b.completion_tokens == 4 and full.text.startswith(b.text) and b.finish_reason == "length"
    assert c.text == full.text[: full.text.index(stop)] and c.finish_reason == "stop"


def test_streamed_deltas_add_up_to_the_result_and_never_show_a_stop_string(engine):
    full = engine.generate("Is there a fracture?", max_new_tokens=20, logit_bias=no_end(engine)).text
    stop = stop_from(full, 8, 3)
    handle = engine.submit_chat(
        "Is there a fracture?", [], SamplingParams(max_new_tokens=20, logit_bias=no_end(engine), stop=(stop,))
    )
    deltas = list(handle)
    assert "".join(deltas) == handle.result.text == full[: full.index(stop)]
    assert all(stop not in "".join(deltas[: k + 1]) for k in range(len(deltas)))


def test_incremental_detokenisation_equals_a_full_decode(engine):
    rng = np.random.default_rng(0)
    vocab = len(engine.tokenizer)
    for _ in range(20):
        req = Request(
            id="t",
            input_ids=[],
            images=[],
            params=SamplingParams(),
            prompt_tokens=0,
            max_new_tokens=64,
            channel=None,
        )
        for t in rng.integers(0, vocab, size=40).tolist():
            req.tokens.append(int(t))
            engine.detokenize(req)
            assert engine.decode(req.tokens).startswith(req.text)
        assert engine.flush(req) == engine.decode(req.tokens)


def test_cancelled_request_stops_and_others_finish(engine):
    slow = engine.submit_chat(
        "Describe the findings.", [], SamplingParams(max_new_tokens=2000, min_tokens=2000)
    )
    other = engine.submit_chat(
        "Describe the findings.", [], SamplingParams(max_new_tokens=2000, min_tokens=8)
    )
    first = next(iter(slow))
    slow.cancel()
    rest = "".join(slow)
    assert slow.result.finish_reason == "cancelled" and slow.result.completion_tokens < 2000
    assert slow.result.text == first + rest
    other.cancel()
    assert other.wait(60).finish_reason == "cancelled"
    assert engine.generate("hi", max_new_tokens=2).completion_tokens >= 1  # the engine still serves


def test_nan_logits_fail_only_their_request_and_the_engine_keeps_serving(model, monkeypatch):
    import torch

    from cambrian_core.serve.request import EngineError

    real = model.decode_step
    calls = {"n": 0}

    def overflowing(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # one row overflows once, mid-answer, while another decodes beside it
            out = out.clone()
            out[0] = float("nan")
        return out

    monkeypatch.setattr(model, "decode_step", overflowing)
    eng = InferenceEngine(model, name="nan", max_batch_size=2, batch_wait=0.2)
    try:
        params = SamplingParams(max_new_tokens=12, min_tokens=12, temperature=0.7)
        broken = eng.submit_chat("What is in the image?", [], params)
        healthy = eng.submit_chat("Is there a fracture?", [], params)
        with pytest.raises(EngineError, match=r"logits are NaN .*--dtype bfloat16 or float32"):
            broken.wait(30)
        assert healthy.wait(30).completion_tokens == 12
        assert eng._thread.is_alive()
        monkeypatch.setattr(model, "decode_step", lambda *a, **k: torch.zeros(()).item() / 0)  # raises
        with pytest.raises(EngineError, match="ZeroDivisionError"):
            eng.generate("hi", max_new_tokens=4)
        monkeypatch.setattr(model, "decode_step", real)
        assert eng.generate("hi", max_new_tokens=3).completion_tokens >= 1  # still serving
    finally:
        eng.shutdown()


def test_leaving_a_stream_early_cancels_its_request(engine):
    handle = engine.submit_chat(
        "Describe the findings.", [], SamplingParams(max_new_tokens=2000, min_tokens=2000)
    )
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(handle):
            if i == 2:
                raise KeyboardInterrupt  # Ctrl-C in `cambrian infer`
    assert handle._req.cancelled.is_set()
    deadline = time.monotonic() + 30
    while not handle._req.done and time.monotonic() < deadline:  # the engine ends it at its next step
        time.sleep(0.02)
    assert handle._req.done and len(handle._req.tokens) < 2000


def test_one_stop_string_is_one_stop_not_its_characters():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    with pytest.raises(RequestError, match="stop must be a string or a list of strings, got 5"):
        SamplingParams(stop=5)


def test_prompt_tokens_count_the_rows_an_unpadded_image_keeps():
    import torch
    from serve_helpers import tiny_config

    from cambrian_core import MODELS, build

    torch.manual_seed(0)
    model = build(MODELS, {**tiny_config(), "image_token_len": 16}).eval()  # a 4x4 grid
    assert model.unpad
    seen = {}
    real = model.prefill

    def prefill(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["used"] = int(out.attention_mask.sum())
        return out

    model.prefill = prefill
    eng = InferenceEngine(model, name="grid4")
    try:
        counts = {}
        for w, h in ((40, 40), (200, 20), (20, 200)):
            res = eng.generate("<image>\nWhat is this?", [image(w, h)], max_new_tokens=1)
            assert res.prompt_tokens == seen["used"], (w, h)
            counts[w, h] = res.prompt_tokens
        # a wide image keeps 2 of 4 rows (2 x 5 positions), a tall one 4 rows of 2 columns (4 x 3)
        assert counts[40, 40] - counts[200, 20] == 4 * 5 - 2 * 5
        assert counts[40, 40] - counts[20, 200] == 4 * 5 - 4 * 3
    finally:
        eng.shutdown()


def test_limits_are_refused_before_queueing(engine):
    with pytest.raises(RequestError, match="too many images: 4 were sent but at most 3"):
        engine.submit_chat("hi", [image()] * 4)
    with pytest.raises(RequestError, match=r"needs .* positions .* context is 512"):
        engine.submit_chat("finding " * 600)
    with pytest.raises(RequestError, match="1 <image> marker"):
        engine.tokenize_prompt("<image> hi", 2)
    with pytest.raises(RequestError, match="temperature must be in"):
        SamplingParams(temperature=3)
    with pytest.raises(RequestError, match="max_new_tokens must be an integer"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(RequestError, match="roles must alternate"):
        engine.submit_chat([{"role": "assistant", "content": "hi"}])
    room = engine.context_length - engine.prompt_positions(
        engine.tokenize_messages([{"role": "user", "content": "hi"}], 0)
    )
    assert engine.generate("hi", max_new_tokens=4096, min_tokens=4096).completion_tokens == room  # budget cut


def test_a_full_queue_answers_503(model):
    eng = InferenceEngine(model, name="q", max_batch_size=1, max_queue=1)
    try:
        busy = eng.submit_chat("hi", [], SamplingParams(max_new_tokens=2000, min_tokens=2000))
        next(iter(busy))  # running: the queue is empty again
        eng.submit_chat("hi", [], SamplingParams(max_new_tokens=2))
        with pytest.raises(RequestError, match="busy") as err:
            eng.submit_chat("hi", [], SamplingParams(max_new_tokens=2))
        assert err.value.status == 503
        busy.cancel()
    finally:
        eng.shutdown()


def test_nothing_per_request_is_stored_on_the_model(model, engine):
    before = {k for k in vars(model) if not k.startswith("_")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    threads = [
        threading.Thread(target=engine.generate, args=(q, [image(seed=k)]), kwargs={"max_new_tokens": 6})
        for k, q in enumerate(QUESTIONS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {k for k in vars(model) if not k.startswith("_")} == before
    assert all(torch_equal(state[k], v) for k, v in model.state_dict().items())
    # text only after an image: no stale image features leak into the answer
    text_only = engine.generate("What is in the image?", max_new_tokens=8)
    fresh = InferenceEngine(model, name="fresh")
    try:
        assert fresh.generate("What is in the image?", max_new_tokens=8).text == text_only.text
    finally:
        fresh.shutdown()


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# ---------------------------------------------------------------------------------------------- images
def test_sniffing_uses_the_bytes_not_a_name(tmp_path):
    import nibabel

    assert sniff_kind(png_bytes()) == "raster"
    assert sniff_kind(Path(ct_small()).read_bytes()) == "dicom"
    nii = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    gz = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "standard.nii.gz")
    assert sniff_kind(Path(nii).read_bytes()) == sniff_kind(Path(gz).read_bytes()) == "nifti"
    assert sniff_kind(b"\x1f\x8b" + b"junk" * 100) is None and sniff_kind(b"hello") is None


def test_postscript_uploads_never_reach_ghostscript(monkeypatch):
    import io

    from PIL import EpsImagePlugin, Image

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a))
    eps = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(eps, "EPS")  # what Pillow would hand to `gs` on load()
    assert Image.open(io.BytesIO(eps.getvalue())).format == "EPS"
    assert sniff_kind(eps.getvalue()) is None
    with pytest.raises(RequestError, match=r"upload \(\d+ bytes\) is not an image: expected PNG, JPEG, TIFF"):
        image_from_bytes(eps.getvalue(), "upload")
    assert not called
    for fmt in ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP"):
        raw = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(raw, fmt)
        assert image_from_bytes(raw.getvalue()).size == (8, 8), fmt


def test_scans_arrive_as_bytes_with_window_and_slice_options():
    import nibabel

    dcm = Path(ct_small()).read_bytes()
    soft = np.asarray(image_from_bytes(dcm, options=ScanOptions(window="abdomen")))
    bone = np.asarray(image_from_bytes(dcm, options=ScanOptions(window="bone")))
    assert soft.shape == (128, 128, 3) and np.abs(soft.astype(int) - bone.astype(int)).mean() > 10
    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    axial = image_from_bytes(Path(path).read_bytes(), options=ScanOptions(slice_axis="axial"))
    coronal = image_from_bytes(Path(path).read_bytes(), options=ScanOptions(slice_axis="coronal"))
    assert axial.mode == "RGB" and axial.size != coronal.size


def test_scans_over_the_voxel_limit_are_refused_before_decoding(monkeypatch):
    import gzip
    import io

    import nibabel

    from cambrian_core.data import medimage

    vol = nibabel.Nifti1Image(np.zeros((64, 64, 32), np.int16), np.eye(4))
    buf = io.BytesIO()
    buf.write(vol.to_bytes())
    packed = gzip.compress(buf.getvalue())  # 256 KiB of voxels in ~1 KiB: a small upload, a large volume
    assert len(packed) < 4096

    def no_decoding(*args, **kwargs):
        raise AssertionError("the volume was decoded")

    monkeypatch.setattr(medimage, "load_image", no_decoding)
    small = ImageLimits(max_voxels=100_000)
    with pytest.raises(
        RequestError,
        match=r"images\[0\] is a nifti scan of 64x64x32 = 131,072 voxels; the limit is 100,000 voxels per scan",
    ) as err:
        image_from_bytes(packed, "images[0]", small)
    assert err.value.status == 413
    with pytest.raises(RequestError, match=r"images\[1\] is a dicom scan of 1x128x128x1 ") as err:
        image_from_bytes(Path(ct_small()).read_bytes(), "images[1]", ImageLimits(max_voxels=10_000))
    assert err.value.status == 413


def test_image_refusals_name_the_image_and_the_limit(tmp_path):
    with pytest.raises(RequestError, match="images\\[2\\] is not valid base64"):
        decode_base64("%%%", "images[2]")
    assert decode_base64(base64.urlsafe_b64encode(b"\xfb\xff").decode().rstrip("=")) == b"\xfb\xff"
    with pytest.raises(RequestError, match="is not an image"):
        image_from_bytes(b"GIF? no, text", "images[0]")
    big = ImageLimits(max_bytes=1000)
    with pytest.raises(RequestError, match=r"the limit is 0\.0 MiB") as err:
        image_from_bytes(png_bytes(100, 100), "images[0]", big)
    assert err.value.status == 413
    with pytest.raises(RequestError, match="megapixels") as err:
        image_from_bytes(png_bytes(300, 300), limits=ImageLimits(max_pixels=50_000))
    assert err.value.status == 413
    with pytest.raises(RequestError, match="local file paths are disabled"):
        image_from_url(ct_small())
    with pytest.raises(RequestError, match="remote URLs are not fetched"):
        image_from_url("http://example.com/a.png")
    assert image_from_url(ct_small(), allow_local_files=True).size == (128, 128)
    assert image_from_url("file://" + ct_small(), allow_local_files=True).size == (128, 128)
    jpeg_like = data_url(png_bytes(seed=2))
    assert image_from_url(jpeg_like).size == (40, 30)
    import io

    buf = io.BytesIO()
    image(8, 8).save(buf, format="JPEG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    assert b64.startswith("/9j/") and image_from_url(b64).size == (8, 8)  # a JPEG's base64 is not a path


# ------------------------------------------------------------------------------------------ continuous batching
def test_a_request_joins_a_running_decode_and_both_equal_solo_runs(model, engine):
    """B arrives while A decodes; it joins A's batch (finishing long before A) and both answers equal what
    each gets alone, although their caches were padded, merged, selected and trimmed on the way."""
    solo = InferenceEngine(model, name="solo", max_batch_size=1, continuous=False)  # plain generate()
    try:
        long_q, short_q = ("Describe the findings.", [image(48, 30, seed=5)]), ("left or right?", [])
        alone = [
            solo.generate(q, imgs, max_new_tokens=n, min_tokens=n).text
            for (q, imgs), n in ((long_q, 300), (short_q, 6))
        ]
    finally:
        solo.shutdown()
    a = engine.submit_chat(long_q[0], long_q[1], SamplingParams(max_new_tokens=300, min_tokens=300))
    stream = iter(a)
    first = next(stream)  # A is decoding
    b = engine.submit_chat(short_q[0], short_q[1], SamplingParams(max_new_tokens=6, min_tokens=6))
    b_result = b.wait(60)
    assert not a._req.done, "B had to wait for A's whole answer: it did not join the running batch"
    rest = "".join(stream)
    assert first + rest == a.result.text == alone[0]
    assert b_result.text == alone[1] and b_result.completion_tokens == 6


def test_sampling_helper_bans_greedy_and_nucleus():
    import torch

    from cambrian_core.serve.batching import sample_tokens

    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_tokens(logits, [0, 0, 0], [1, 1, 1], [[], [1], []]) == [1, 3, 0]
    # a tiny nucleus keeps only the most likely token, whatever the temperature
    assert sample_tokens(logits, [1.5, 1.5, 1.5], [1e-6] * 3, [[], [], []]) == [1, 1, 0]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    draws = [sample_tokens(logits, [1.0] * 3, [1.0] * 3, [[], [], []], g) for g in (g1, g2)]
    assert draws[0] == draws[1]


def test_penalties_and_biases_adjust_the_logits():
    import torch

    from cambrian_core.serve.batching import adjust_logits

    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [-1.0, -1.5, -3.0, -3.0], [3.0, 0.0, 0.0, 0.0]])
    before = logits.clone()
    params = [
        SamplingParams(repetition_penalty=1.2),  # over prompt + answer ids; -200 (an image marker) ignored
        SamplingParams(repetition_penalty=2.0),  # a negative logit is multiplied
        SamplingParams(frequency_penalty=0.5, presence_penalty=1.0, logit_bias={"3": 2.5, "99": 1.0}),
    ]
    out = adjust_logits(logits, params, [[1, -200], [0], [2]], [[], [], [0, 0, 1]])
    assert torch.equal(logits, before)  # the caller's logits stay as they were
    expected = torch.tensor(
        [[0.0, 5.0 / 1.2, 1.0, 4.9], [-2.0, -1.5, -3.0, -3.0], [3.0 - 2.0, -1.5, 0.0, 2.5]]
    )
    torch.testing.assert_close(out, expected)  # answer counts only for the OpenAI penalties; id 99 ignored
    assert adjust_logits(logits, [SamplingParams()] * 3, [[1]] * 3, [[1]] * 3) is logits  # nothing to do
    with pytest.raises(RequestError, match=r"repetition_penalty must be in \(0, 2\] \(1 = off\), got 0"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(RequestError, match=r"frequency_penalty must be a number in \[-2, 2\], got 3"):
        SamplingParams(frequency_penalty=3)


def test_seeded_sampling_repeats_and_min_tokens_holds_back_stop_strings(engine):
    ask = dict(max_new_tokens=10, min_tokens=10, temperature=1.0)
    one, two = (engine.generate("Describe the findings.", [], seed=3, **ask).text for _ in range(2))
    assert one == two != engine.generate("Describe the findings.", [], seed=4, **ask).text
    free = engine.generate("Describe the findings.", [], max_new_tokens=16, min_tokens=16).text
    stop = stop_from(free, 1)  # it appears early in the answer: before min_tokens it ends nothing
    held = engine.generate("Describe the findings.", [], max_new_tokens=16, min_tokens=16, stop=(stop,))
    assert (held.text, held.finish_reason) == (free, "length")


def test_the_per_batch_path_penalises_each_row_as_it_would_alone(model):
    solo = InferenceEngine(model, name="solo", max_batch_size=1, continuous=False)
    batched = InferenceEngine(model, name="batch", max_batch_size=4, batch_wait=0.2, continuous=False)
    try:
        ask = dict(max_new_tokens=14, min_tokens=14, repetition_penalty=1.8, frequency_penalty=0.4)
        prompts = ["What is in the image?", "Describe the findings of this chest film in detail.", "hi"]
        alone = [solo.generate(p, [], **ask).text for p in prompts]
        handles = [batched.submit_chat(p, [], SamplingParams(**ask)) for p in prompts]
        assert [h.wait().text for h in handles] == alone
        # unseeded sampling there draws from the advancing global stream (a seed only forks it)
        free = [
            solo.generate("hi", [], max_new_tokens=12, min_tokens=12, temperature=1.0).text for _ in range(3)
        ]
        assert len(set(free)) > 1
    finally:
        solo.shutdown()
        batched.shutdown()


def test_a_repetition_penalty_reaches_the_decoding(engine):
    plain = engine.generate("Describe the findings.", [], max_new_tokens=24, min_tokens=24)
    again = engine.generate(
        "Describe the findings.", [], max_new_tokens=24, min_tokens=24, repetition_penalty=1.0
    )
    penalised = engine.generate(
        "Describe the findings.", [], max_new_tokens=24, min_tokens=24, repetition_penalty=2.0
    )
    assert plain.text == again.text and penalised.text != plain.text


def test_decode_batch_merges_pads_and_trims():
    import torch
    from transformers.cache_utils import DynamicCache

    from cambrian_core.serve.batching import DecodeBatch, mergeable

    def cache(b, length, fill):
        c = DynamicCache()
        c.update(torch.full((b, 2, length, 4), fill), torch.full((b, 2, length, 4), -fill), 0)
        return c

    batch = DecodeBatch()
    assert not mergeable(DynamicCache())
    batch.add(["a"], cache(1, 5, 1.0), torch.ones(1, 5, dtype=torch.long), torch.tensor([5]))
    batch.add(["b", "c"], cache(2, 3, 2.0), torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([2, 3]))
    layer = batch.cache.layers[0]
    assert batch.rows == ["a", "b", "c"] and layer.keys.shape == (3, 2, 5, 4)
    assert batch.mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    assert layer.keys[1, :, :2].abs().sum() == 0 and layer.values[2, 0, 2, 0] == -2.0
    batch.keep([1, 2])  # "a" leaves: two columns are padding for every row left
    assert batch.mask.tolist() == [[0, 1, 1], [1, 1, 1]] and layer.keys.shape == (2, 2, 3, 4)
    assert batch.positions.tolist() == [2, 3]
    _, mask, positions = batch.step_inputs(torch.tensor([7, 8]))
    assert mask.shape == (2, 4) and positions.tolist() == [2, 3] and batch.positions.tolist() == [3, 4]
    batch.keep([])
    assert len(batch) == 0 and batch.cache is None


def test_the_per_batch_fallback_still_serves(model):
    eng = InferenceEngine(model, name="fallback", max_batch_size=4, continuous=False)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            out = list(pool.map(lambda q: eng.generate(q, max_new_tokens=5, min_tokens=5), QUESTIONS[:3]))
        assert all(r.completion_tokens == 5 for r in out)
    finally:
        eng.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_engine_on_cuda_batches_like_solo_runs(tmp_path, dtype):
    """Left padding, cache merging and trimming on the GPU give what each request gets alone."""
    import torch

    from cambrian_core.model.io import load_model

    cuda_model = (
        load_model(save_tiny_model(tmp_path / "tiny-cuda", seed=2)).to("cuda", getattr(torch, dtype)).eval()
    )
    solo = InferenceEngine(cuda_model, name="solo-cuda", max_batch_size=1)
    many = InferenceEngine(cuda_model, name="cuda", max_batch_size=8, batch_wait=0.01)
    try:
        jobs = [(q, [image(30 + 9 * k, 40, seed=k)] if k % 2 == 0 else []) for k, q in enumerate(QUESTIONS)]
        one = [solo.generate(q, imgs, max_new_tokens=12, min_tokens=12) for q, imgs in jobs]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            batched = list(
                pool.map(lambda j: many.generate(j[0], j[1], max_new_tokens=12, min_tokens=12), jobs)
            )
        assert [r.text for r in batched] == [r.text for r in one]
        assert all(r.completion_tokens == 12 for r in batched)
        assert next(cuda_model.parameters()).device.type == "cuda"
    finally:
        solo.shutdown()
        many.shutdown()


def test_dicom_without_its_preamble_and_images_past_pillows_bomb_limit(monkeypatch):
    from PIL import Image as PILImage

    full = Path(ct_small()).read_bytes()
    bare = full[132:]  # no 128-byte preamble, no "DICM": what some writers produce
    assert sniff_kind(bare) == "dicom"
    assert np.array_equal(np.asarray(image_from_bytes(bare)), np.asarray(image_from_bytes(full)))
    assert sniff_kind(b"\x00" * 400) is None
    # the request's pixel limit decides, not Pillow's global ~89.5 MP decompression-bomb limit
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    assert image_from_bytes(png_bytes(100, 100), "images[0]").size == (100, 100)
    with pytest.raises(RequestError, match=r"images\[0\] is 100x100 = 0\.0 megapixels"):
        image_from_bytes(png_bytes(100, 100), "images[0]", ImageLimits(max_pixels=5000))
    assert PILImage.MAX_IMAGE_PIXELS == 1000  # restored
