"""Vision-encoder plugins: registry-wide contract checks on tiny towers, then family-specific behaviour checked
against the backing library (transformers, timm, open_clip) called directly, and the real EfficientNet-Lite0."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file

from cambrian_core.config.schema import check_component
from cambrian_core.model.encoder import StagedTokens
from cambrian_core.registry import ENCODERS, build

NAMES = ENCODERS.names()
WEIGHT_KEYS = {"path", "checkpoint", "weights", "pretrained"}
RED = (200, 30, 60)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny convolutions are dominated by thread start-up; on a shared 2-core machine, oversubscribed OpenMP
    threads make them 50x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(name: str, **overrides) -> torch.nn.Module:
    return build(ENCODERS, {"type": name, **ENCODERS.get(name).tiny_config(), **overrides})


def batch(enc, sizes=((60, 30), (30, 48))) -> torch.Tensor:
    """Preprocessed PIL images of different aspect ratios."""
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return torch.stack([enc.preprocess(im) for im in imgs])


# ---------------------------------------------------------------------------------------------- registry-wide
def test_builtin_encoders_registered():
    assert {
        "siglip",
        "siglip_hf",
        "clip",
        "dinov2",
        "convnext",
        "timm",
        "efficientnet_lite0",
        "open_clip",
    } <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_shape_and_dtype(name, dtype):
    enc = tiny(name, dtype=dtype)
    out = enc(batch(enc))
    assert out.shape == (2, enc.token_len, enc.hidden_size)
    assert out.dtype == getattr(torch, dtype)
    assert torch.isfinite(out.float()).all()
    assert math.isqrt(enc.token_len) ** 2 == enc.token_len


@pytest.mark.parametrize("name", NAMES)
def test_forward_staged_gives_the_forward_tokens(name):
    """``forward_staged`` is ``forward`` for single-grid towers; a multi-stage tower's ``StagedTokens`` hold the
    same tokens, and its first projection matches projecting those tokens."""
    enc = tiny(name)
    x = batch(enc)
    with torch.no_grad():
        out, staged = enc(x), enc.forward_staged(x)
        if isinstance(staged, StagedTokens):
            assert staged.shape == out.shape and staged.dtype == out.dtype
            torch.testing.assert_close(staged.tokens(), out, rtol=0, atol=0)
            lin = torch.nn.Linear(enc.hidden_size, 8)
            torch.testing.assert_close(staged.project(lin), lin(out), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(staged, out, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_rebuild_from_architecture_config(name):
    enc = tiny(name)
    arch = enc.architecture_config()
    assert "type" not in arch
    assert not {k for k, v in arch.items() if k in WEIGHT_KEYS and v not in (None, False)}
    arch = json.loads(json.dumps(arch))  # a saved model stores it as JSON
    again = build(ENCODERS, {"type": name, **arch})
    again.load_state_dict(enc.state_dict())
    x = batch(enc)
    assert torch.equal(enc(x), again(x))
    assert enc.cache_key() == again.cache_key()
    # the feature cache's key sees any weight change, even one that keeps every tensor's sum (a swap)
    weight = max((p for p in again.parameters() if p.numel() > 1), key=lambda p: p.numel())
    with torch.no_grad():
        flat = weight.view(-1)
        flat[0], flat[1] = flat[1].clone(), flat[0].clone()
    assert not torch.equal(flat[0], flat[1]) and again.cache_key() != enc.cache_key()


@pytest.mark.parametrize("name", NAMES)
def test_freeze(name):
    frozen = tiny(name)
    assert frozen.frozen and not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(batch(frozen)).requires_grad
    trainable = tiny(name, freeze=False)
    out = trainable(batch(trainable))
    out.float().square().mean().backward()
    grads = [p.grad for p in trainable.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("freeze", [True, False])
def test_the_configured_freeze_is_saved_not_the_stages_state(name, freeze):
    enc = tiny(name, freeze=freeze)
    enc.set_frozen(not freeze)  # what a stage does (full unfreezes a frozen tower, pretrain freezes one)
    assert enc.architecture_config().get("freeze", freeze) is freeze


@pytest.mark.parametrize("name", NAMES)
def test_preprocess_pads_with_mean_colour(name):
    enc = tiny(name)
    s = enc.image_size
    mean, std = torch.tensor(enc.image_mean), torch.tensor(enc.image_std)
    pad = (torch.tensor(enc.fill_color) / 255 - mean) / std
    red = (torch.tensor(RED) / 255 - mean) / std
    safe = s // 4 - math.ceil(2 * s / 64) - 1  # rows clear of the bicubic kernel at the band edge
    assert safe >= 2
    wide = enc.preprocess(Image.new("RGB", (64, 32), RED))  # bands above and below
    tall = enc.preprocess(Image.new("RGB", (32, 64), RED))  # bands left and right
    assert wide.shape == tall.shape == (3, s, s)
    for band in (wide[:, :safe], wide[:, -safe:], tall[:, :, :safe], tall[:, :, -safe:]):
        assert torch.allclose(band, pad.view(3, 1, 1).expand_as(band), atol=1e-5)
    centre = wide[:, s // 2 - 1 : s // 2 + 1, s // 2 - 1 : s // 2 + 1]
    assert torch.allclose(centre, red.view(3, 1, 1).expand_as(centre), atol=1e-4)
    assert enc.fill_color == tuple(int(m * 255) for m in enc.image_mean)  # truncated, as LLaVA / HF Llava


# ---------------------------------------------------------------------------------------------- config checks
@pytest.mark.parametrize("name", ["clip", "convnext", "open_clip"])
def test_non_square_token_len_errors(name):
    with pytest.raises(ValueError, match=r"token_len=10 is not a perfect square"):
        tiny(name, token_len=10)
    cfg = {"type": name, **ENCODERS.get(name).tiny_config(), "token_len": 10}
    problems = check_component("encoders", cfg, "model.encoders[0]")
    assert [p for p in problems if "token_len=10 is not a perfect square; use e.g. 9 or 16" in str(p)]


def test_config_check_reports_missing_weight_files(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    problems = check_component("encoders", {"type": "siglip", "checkpoint": missing}, "enc")
    assert any(f"checkpoint={missing!r} does not exist" in str(p) for p in problems)
    assert not check_component("encoders", {"type": "clip", **ENCODERS.get("clip").tiny_config()}, "enc")
    both = {"type": "clip", "path": str(tmp_path), **ENCODERS.get("clip").tiny_config()}
    assert any("exactly one of path=" in str(p) for p in check_component("encoders", both, "enc"))
    assert any(
        "exactly one of model_name=" in str(p)
        for p in check_component("encoders", {"type": "open_clip"}, "e")
    )


def test_config_dims_without_weights(tmp_path):
    conv = ENCODERS.get("convnext")
    assert conv.config_dims({"token_len": 9216}) == {
        "hidden_size": 384 + 768 + 1536 + 3072,
        "token_len": 9216,
    }
    small = ENCODERS.get("convnext").tiny_config()["model_kwargs"]
    assert conv.config_dims({"model_kwargs": small, "single_stage": True, "image_size": 64}) == {
        "hidden_size": 32,
        "token_len": 4,
    }
    assert ENCODERS.get("siglip").config_dims({}) == {"hidden_size": 1152, "token_len": 729}
    lite = ENCODERS.get("efficientnet_lite0").config_dims({"pretrained": True, "stages": [3, 4]})
    assert lite == {"hidden_size": 112 + 320, "token_len": 49}
    enc = tiny("dinov2")
    enc.model.save_pretrained(tmp_path)
    dims = ENCODERS.get("dinov2").config_dims({"path": str(tmp_path), "image_size": 48})
    assert dims == {"hidden_size": 32, "token_len": 36}


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of path="):
        build(ENCODERS, {"type": "clip"})
    with pytest.raises(FileNotFoundError, match=r"not a local Hugging Face model folder.*never download"):
        build(ENCODERS, {"type": "clip", "path": str(tmp_path)})
    with pytest.raises(
        ValueError, match="unknown CLIPVisionConfig key `hiden_size` \\(did you mean `hidden_size`"
    ):
        build(ENCODERS, {"type": "clip", "config": {"hiden_size": 32}})
    with pytest.raises(ValueError, match="select_layer=5 is out of range for 2 layers"):
        tiny("clip", select_layer=5)
    with pytest.raises(ValueError, match=r"timm has no model `resnet_18`\. Did you mean `resnet18`"):
        build(ENCODERS, {"type": "timm", "model_name": "resnet_18"})
    with pytest.raises(ValueError, match="stage index 7 is out of range for `test_resnet`, which has 5"):
        tiny("timm", stages=[7])
    with pytest.raises(ValueError, match=r"unknown model `ViT-B-61`\. Did you mean `ViT-B-16`"):
        build(ENCODERS, {"type": "open_clip", "model_name": "ViT-B-61"})
    with pytest.raises(ValueError, match="dtype='float64' is not supported"):
        tiny("siglip", dtype="float64")


# ---------------------------------------------------------------------------------------------- HF families
def test_clip_drops_cls_and_takes_penultimate_layer():
    enc = tiny("clip", token_len=None)
    direct = transformers.CLIPVisionModel(enc.model.config).eval()
    direct.load_state_dict(enc.model.state_dict())
    x = batch(enc)
    with torch.no_grad():
        hidden = direct(pixel_values=x, output_hidden_states=True).hidden_states
    out = enc(x)
    assert out.shape == (2, 16, 32)  # 4x4 patches, CLS gone
    torch.testing.assert_close(out, hidden[-2][:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(out, hidden[-1][:, 1:], atol=1e-3)
    last = tiny("clip", token_len=None, select_layer=None)
    last.load_state_dict(enc.state_dict())
    torch.testing.assert_close(last(x), direct(pixel_values=x).last_hidden_state[:, 1:], rtol=0, atol=1e-6)


def test_clip_interpolates_to_token_len_in_fp32():
    enc = tiny("clip")  # native 4x4 -> 3x3
    x = batch(enc)
    native = enc.forward_features(x)
    grid = native.transpose(1, 2).reshape(2, 32, 4, 4)
    ref = F.interpolate(grid, size=(3, 3), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(enc(x), ref.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)


def test_dinov2_resolution_override_interpolates_positions():
    enc = tiny("dinov2", token_len=None)  # trained at 64 px (8x8), run at 48 px
    assert (enc.image_size, enc.native_grid, enc.token_len) == (48, 6, 36)
    assert enc.model.embeddings.position_embeddings.shape[1] == 1 + 8 * 8
    direct = transformers.Dinov2Model(enc.model.config).eval()
    direct.load_state_dict(enc.model.state_dict())
    x = batch(enc)
    with torch.no_grad():
        ref = direct(pixel_values=x).last_hidden_state
    assert ref.shape[1] == 1 + 36
    torch.testing.assert_close(enc(x), ref[:, 1:], rtol=0, atol=1e-6)


def test_dinov2_with_registers_drops_register_tokens():
    cfg = {**ENCODERS.get("dinov2").tiny_config()["config"], "num_register_tokens": 2}
    enc = build(ENCODERS, {"type": "dinov2", "config": cfg})
    assert isinstance(enc.model, transformers.Dinov2WithRegistersModel)
    x = batch(enc)
    with torch.no_grad():
        ref = enc.model(pixel_values=x).last_hidden_state
    assert ref.shape[1] == 1 + 2 + 64
    torch.testing.assert_close(enc(x), ref[:, 3:], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["clip", "siglip_hf", "dinov2"])
def test_local_hf_folder_round_trip(name, tmp_path):
    enc = tiny(name)
    enc.model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3]}))
    loaded = build(ENCODERS, {"type": name, "path": str(tmp_path), "token_len": enc.token_len})
    loaded_arch = loaded.architecture_config()
    if name == "dinov2":
        loaded = build(ENCODERS, {"type": name, "path": str(tmp_path), "token_len": 16, "image_size": 48})
    assert loaded.image_mean == (0.1, 0.2, 0.3) and loaded.image_std == enc.image_std
    x = batch(enc)
    torch.testing.assert_close(loaded(x), enc(x), rtol=0, atol=0)
    assert loaded_arch["config"]["hidden_size"] == 32 and "path" not in loaded_arch


def test_clip_and_siglip_load_vision_half_of_full_model(tmp_path):
    vision = ENCODERS.get("clip").tiny_config()["config"]
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    full = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text)).eval()
    full.save_pretrained(tmp_path / "clip")
    sig = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval()
    sig.save_pretrained(tmp_path / "siglip")
    clip = build(ENCODERS, {"type": "clip", "path": str(tmp_path / "clip")})
    siglip = build(ENCODERS, {"type": "siglip_hf", "path": str(tmp_path / "siglip")})
    x = batch(clip)
    with torch.no_grad():
        ref_clip = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        ref_sig = sig.vision_model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(clip(x), ref_clip, rtol=0, atol=0)
    torch.testing.assert_close(siglip(x), ref_sig, rtol=0, atol=0)
    assert (
        not hasattr(siglip.model, "head")
        and siglip.architecture_config()["config"]["vision_use_head"] is False
    )


def test_hf_folder_missing_weights_errors(tmp_path):
    tiny("dinov2").model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lacks \d+ weights of CLIPVisionModel"):
        build(ENCODERS, {"type": "clip", "path": str(tmp_path)})


# ---------------------------------------------------------------------------------------------- timm families
def _resized(maps, side):
    out = []
    for m in maps:
        shrink = m.shape[-1] > side
        m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)
        out.append(m.flatten(2).transpose(1, 2))
    return torch.cat(out, dim=-1)


def test_convnext_multi_stage_and_single_stage():
    cfg = ENCODERS.get("convnext").tiny_config()
    multi = tiny("convnext")
    assert multi.hidden_size == 8 + 16 + 24 + 32 and multi.native_grid == 2
    ref = timm.create_model("convnext_xxlarge", pretrained=False, **cfg["model_kwargs"]).eval()
    ref.load_state_dict(multi.trunk.state_dict(), strict=False)
    x = batch(multi)
    with torch.no_grad():
        maps = ref.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]  # 16x16 shrinks and 2x2 grows to 4x4
    out = multi(x)
    torch.testing.assert_close(out, _resized(maps, 4), rtol=0, atol=1e-6)
    staged = multi.forward_staged(x)  # 16x16 and 8x8 shrunk to the 4x4 grid and merged, 2x2 kept as it is
    assert [tuple(p.shape) for p in staged.parts] == [(2, 48, 4, 4), (2, 32, 2, 2)]
    single = tiny("convnext", single_stage=True)
    assert single.hidden_size == 32
    single.load_state_dict(multi.state_dict())
    torch.testing.assert_close(single(x), out[..., -32:], rtol=0, atol=0)


def test_timm_checkpoint_round_trip(tmp_path):
    src = timm.create_model("test_resnet", pretrained=False).eval()
    torch.save({"state_dict": src.state_dict()}, tmp_path / "resnet.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "resnet.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = _resized(src.forward_intermediates(x, indices=[3, 4], intermediates_only=True), 4)
    for name in ("resnet.pth", "resnet.safetensors"):
        enc = tiny("timm", checkpoint=str(tmp_path / name))
        torch.testing.assert_close(enc(x), ref, rtol=0, atol=1e-6)
    other = timm.create_model("test_convnext", pretrained=False)
    torch.save(other.state_dict(), tmp_path / "convnext.pth")
    with pytest.raises(ValueError, match="no key matches this tower"):
        tiny("timm", checkpoint=str(tmp_path / "convnext.pth"))


def _biomedclip_style(tmp_path):
    """A tiny open_clip CLIP whose image tower is a timm trunk (like BiomedCLIP), saved as a checkpoint."""
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 160,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    model = open_clip.CLIP(**cfg).eval()
    torch.save(model.state_dict(), tmp_path / "open_clip.pt")
    return cfg, model


def test_open_clip_timm_trunk_checkpoint_and_folder(tmp_path):
    cfg, model = _biomedclip_style(tmp_path)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        ref = model.visual.trunk.forward_features(x)[:, 1:]  # drop the CLS token: 10x10 patch tokens
    enc = build(ENCODERS, {"type": "open_clip", "config": cfg, "checkpoint": str(tmp_path / "open_clip.pt")})
    assert (enc.hidden_size, enc.native_grid) == (64, 10)
    torch.testing.assert_close(enc(x), ref, rtol=0, atol=1e-5)
    # the SigLIP tower reads the same open_clip `visual.trunk.*` keys
    sig = build(
        ENCODERS, {"type": "siglip", "model_name": "test_vit", "checkpoint": str(tmp_path / "open_clip.pt")}
    )
    torch.testing.assert_close(sig(x), ref, rtol=0, atol=1e-5)
    # a Hugging Face-style open_clip folder
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    pre = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    from_folder = build(ENCODERS, {"type": "open_clip", "path": str(folder)})
    assert from_folder.image_mean == (0.1, 0.2, 0.3)
    torch.testing.assert_close(from_folder(x), ref, rtol=0, atol=1e-5)
    assert "path" not in from_folder.architecture_config()


def test_open_clip_native_vit_tokens_and_select_layer(tmp_path):
    import open_clip

    cfg = ENCODERS.get("open_clip").tiny_config()["config"]
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=text).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    model.visual.output_tokens = True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, tokens = model.visual(x)  # open_clip's own patch tokens, after ln_post
    enc = build(ENCODERS, {"type": "open_clip", "config": cfg, "checkpoint": str(tmp_path / "vit.pt")})
    torch.testing.assert_close(enc(x), tokens, rtol=0, atol=1e-5)
    pen = build(
        ENCODERS,
        {"type": "open_clip", "config": cfg, "checkpoint": str(tmp_path / "vit.pt"), "select_layer": -2},
    )
    assert len(pen.visual.transformer.resblocks) == 1  # the unused last block is pruned
    with torch.no_grad():
        emb = model.visual._embeds(x)
        first = model.visual.transformer.resblocks[0](emb)
    torch.testing.assert_close(pen(x), first[:, 1:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- real weights
def test_efficientnet_lite0_real_weights_classify_cat():
    from cambrian_plugins.encoders.efficientnet_lite0 import efficientnet_lite0_state_dict
    from skimage import data

    state = efficientnet_lite0_state_dict()
    classifier = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    classifier.load_state_dict(state)
    enc = build(
        ENCODERS, {"type": "efficientnet_lite0", "pretrained": True, "stages": [2, 4], "token_len": 49}
    )
    pixels = enc.preprocess(Image.fromarray(data.chelsea()))[None]  # 451x300, padded with the ImageNet mean
    with torch.no_grad():
        probs = classifier(pixels).softmax(-1)[0]
        maps = classifier.forward_intermediates(pixels, indices=[2, 4], intermediates_only=True)
    top3 = probs.topk(3).indices.tolist()
    assert top3[0] in {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert probs[[281, 282, 285]].sum() > 0.7
    assert enc.hidden_size == 40 + 320
    torch.testing.assert_close(enc(pixels), _resized(maps, 7), rtol=0, atol=1e-5)


def test_frozen_batchnorm_tower_stays_in_eval():
    enc = tiny("efficientnet_lite0")
    before = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k}
    enc.train()
    assert not enc.training
    enc(batch(enc))
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    enc.set_frozen(False)
    enc.train()
    assert enc.training


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name, monkeypatch):
    # cuDNN convolutions default to TF32 (10-bit mantissa): compare the maths, not that precision choice
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    enc = tiny(name)
    x = batch(enc)
    ref = enc(x)
    gpu = enc.to("cuda")
    out = gpu(x)  # the tower moves CPU pixels to its own device
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-2, atol=1e-2)


def test_clip_mean_pad_colour_matches_llava() -> None:
    from cambrian_core.model.encoder import CLIP_MEAN

    class _Probe:
        image_mean = CLIP_MEAN
        cambrian1_compat = False
        cambrian1_pad_mean = None

    from cambrian_core.model.encoder import VisionEncoder

    assert VisionEncoder.fill_color.fget(_Probe()) == (122, 116, 104)  # reference §B.3
