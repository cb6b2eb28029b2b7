"""The one-process Gradio demo: ``gradio_client`` against its API, and a real browser uploading a DICOM."""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pytest
from PIL import Image
from serve_helpers import ct_small, save_tiny_model

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    from cambrian_core.model.io import load_model
    from cambrian_core.serve.demo import build_demo
    from cambrian_core.serve.engine import InferenceEngine
    from cambrian_core.serve.server import free_port
    from cambrian_core.serve.ui import launch

    folder = save_tiny_model(tmp_path_factory.mktemp("demo") / "tiny-d", seed=3)
    engine = InferenceEngine(load_model(folder), name="tiny-d")
    demo = build_demo(engine)
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", engine
    finally:
        demo.close()
        engine.shutdown()


@pytest.fixture()
def client(demo_app):
    return gradio_client.Client(demo_app[0], verbose=False)


def test_render_applies_the_window_to_an_uploaded_dicom(client):
    from gradio_client import handle_file

    from cambrian_core.serve.ui import render_scan

    soft = np.asarray(
        Image.open(client.predict(handle_file(ct_small()), "abdomen", "axial", api_name="/render"))
    )
    bone = np.asarray(
        Image.open(client.predict(handle_file(ct_small()), "bone", "axial", api_name="/render"))
    )
    assert soft.shape[:2] == (128, 128) and soft.std() > 20  # CT_small is 128x128
    np.testing.assert_array_equal(soft[..., :3], np.asarray(render_scan(ct_small(), "abdomen")))
    assert np.abs(soft.astype(int) - bone.astype(int)).mean() > 10


def test_render_reads_nifti_volumes(client):
    import nibabel
    from gradio_client import handle_file

    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    axial = np.asarray(Image.open(client.predict(handle_file(path), "auto", "axial", api_name="/render")))
    coronal = np.asarray(Image.open(client.predict(handle_file(path), "auto", "coronal", api_name="/render")))
    assert (axial.std() > 5 and axial.shape != coronal.shape) or not np.array_equal(axial, coronal)


def test_a_file_that_is_not_an_image_is_refused_with_its_reason(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "notes.dcm"
    bad.write_bytes(b"these are notes, not pixels" * 10)
    with pytest.raises(Exception, match="is not an image"):
        client.predict(handle_file(str(bad)), "auto", "axial", api_name="/render")


def answer(history) -> str:
    from cambrian_core.serve.ui import _text_of

    return _text_of(history[-1]["content"])


def test_chat_streams_answers_about_the_scan_and_keeps_history(client, demo_app):
    from gradio_client import handle_file

    from cambrian_core.serve.ui import render_scan

    _, engine = demo_app
    scan = render_scan(ct_small(), "abdomen")
    history, box = client.predict(
        "What is in the image?",
        [],
        handle_file(ct_small()),
        "abdomen",
        "axial",
        0.0,
        1.0,
        10,
        "tiny-d",
        api_name="/chat",
    )
    assert box == "" and [m["role"] for m in history] == ["user", "assistant"]
    first = [{"role": "user", "content": "<image>\nWhat is in the image?"}]
    expected = engine.generate(first, [scan], max_new_tokens=10)
    assert answer(history) == expected.text.strip()  # the Chatbot strips surrounding whitespace
    # second turn, same scan: the image stays attached to the first question only
    history2, _ = client.predict(
        "Is there a fracture?",
        history,
        handle_file(ct_small()),
        "abdomen",
        "axial",
        0.0,
        1.0,
        10,
        "tiny-d",
        api_name="/chat",
    )
    assert [m["role"] for m in history2] == ["user", "assistant"] * 2
    convo = [
        *first,
        {"role": "assistant", "content": answer(history)},
        {"role": "user", "content": "Is there a fracture?"},
    ]
    assert answer(history2) == engine.generate(convo, [scan], max_new_tokens=10).text.strip()
    job = client.submit(
        "Describe it.",
        [],
        handle_file(ct_small()),
        "abdomen",
        "axial",
        0.0,
        1.0,
        24,
        "tiny-d",
        api_name="/chat",
    )
    outputs = list(job)  # each streamed update of the chat
    assert len(outputs) >= 2 and answer(outputs[-1][0]) == answer(job.result()[0])


def longest_run(flags: np.ndarray) -> slice:
    """The longest stretch of ``True`` in ``flags``."""
    best, start = (0, 0), None
    for i, f in enumerate([*flags.tolist(), False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            best = max(best, (i - start, start))
            start = None
    return slice(best[1], best[1] + best[0])


@pytest.mark.browser
def test_browser_upload_shows_the_rendered_dicom(demo_app, tmp_path):
    from cdp_pipe import Browser

    from cambrian_core.serve.ui import render_scan

    url, _ = demo_app
    with Browser(str(tmp_path / "chromium-profile")) as browser:
        browser.open(url)
        browser.wait_for("document.querySelector('#scan input[type=file]') !== null")
        browser.set_file("#scan input[type=file]", ct_small())  # what a user's file dialog does
        browser.wait_for(
            "(() => { const i = document.querySelector('#preview img');"
            " return !!i && i.complete && i.naturalWidth > 0; })()"
        )
        box = browser.evaluate(
            "(() => { const r = document.querySelector('#preview img').getBoundingClientRect();"
            " return [r.x, r.y, r.width, r.height]; })()"
        )
        png = browser.screenshot()
    shot_path = tmp_path / "demo_dicom.png"
    shot_path.write_bytes(png)
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("L")).astype(int)
    assert shot.shape == (1000, 1280) and len(png) > 20_000 and shot.std() > 10
    x, y, w, h = (round(v) for v in box)
    panel = shot[y : y + h, x : x + w]
    dark = panel < 200  # the scan inside the white preview panel (labels and borders are sparse or light)
    rows, cols = longest_run(dark.sum(1) > 48), longest_run(dark.sum(0) > 48)
    crop = panel[rows, cols]
    expected = np.asarray(render_scan(ct_small(), "auto").convert("L").resize(crop.shape[::-1])).astype(int)
    assert crop.shape[0] > 64 and abs(crop.shape[0] - crop.shape[1]) <= 2
    assert np.corrcoef(crop.ravel(), expected.ravel())[0, 1] > 0.95
    assert glob.glob(str(tmp_path / "*.png")) == [str(shot_path)]
