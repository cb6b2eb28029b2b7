"""``tower_cambrian1_compat``: towers resize and pad as Cambrian-1 did, for its released connectors (spec B.2/B.3)."""

from __future__ import annotations

import cambrian_parts as P  # registers the test parts (test_grid connector, test_llama LLM)
import torch
import torch.nn.functional as F
from PIL import Image

from cambrian_core import ENCODERS, MODELS, build
from cambrian_core.model.encoder import StagedTokens, interpolate_tokens, resize_map
from cambrian_core.model.io import load_model


def _plain_bilinear(x: torch.Tensor, side: int) -> torch.Tensor:
    """Spec B.2: bilinear, align_corners=False, in fp32, no antialiasing."""
    return F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False)


def test_plain_bilinear_shrinking_on_request():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 5, 27, 27, generator=g)
    tokens = maps.flatten(2).transpose(1, 2)
    plain = _plain_bilinear(maps, 24).flatten(2).transpose(1, 2)
    torch.testing.assert_close(interpolate_tokens(tokens, 576, antialias=False), plain, rtol=0, atol=0)
    torch.testing.assert_close(resize_map(maps, 24, antialias=False), plain, rtol=0, atol=0)
    assert (interpolate_tokens(tokens, 576) - plain).abs().max() > 0.05  # the default antialiases
    staged = StagedTokens.from_maps([maps, maps[:, :, :12, :12]], 24, antialias=False)
    torch.testing.assert_close(staged.parts[0], _plain_bilinear(maps, 24), rtol=0, atol=0)


def _model_config(compat: bool) -> dict:
    P.register()
    enc = [
        {"type": "siglip", **ENCODERS.get("siglip").tiny_config()},
        {"type": "convnext", **ENCODERS.get("convnext").tiny_config()},
    ]
    return P.model_config(
        vision_tower_aux_list=enc, vision_tower_aux_token_len_list=[16, 16], tower_cambrian1_compat=compat
    )


def test_the_model_switch_reaches_every_tower_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    plain = build(MODELS, _model_config(False))
    torch.manual_seed(0)
    compat = build(MODELS, _model_config(True))
    siglip, convnext = compat.towers
    assert [t.cambrian1_compat for t in compat.towers] == [True, True]
    assert not any(t.resize_antialias for t in compat.towers) and all(
        t.resize_antialias for t in plain.towers
    )
    # SigLIP: Cambrian-1 padded with the CLIP mean, not SigLIP's own 0.5 grey
    assert (plain.towers[0].fill_color, siglip.fill_color) == ((127, 127, 127), (122, 116, 104))
    wide = Image.new("RGB", (80, 40), (255, 255, 255))
    corner = siglip.preprocess(wide)[:, 0, 0] * torch.tensor(siglip.image_std) + torch.tensor(
        siglip.image_mean
    )
    torch.testing.assert_close(corner, torch.tensor([122, 116, 104]) / 255.0, rtol=0, atol=1e-6)
    # ConvNeXt: its larger stages shrink to the grid by plain bilinear
    px = torch.randn(1, 3, convnext.image_size, convnext.image_size)
    with torch.no_grad():
        maps = convnext.trunk.forward_intermediates(
            px, indices=list(convnext.stages), norm=convnext.final_norm, intermediates_only=True
        )
        want = StagedTokens.from_maps(maps, convnext.grid, antialias=False).tokens()
        torch.testing.assert_close(convnext(px), want)
        assert (plain.towers[1](px) - want).abs().max() > 1e-4
    assert convnext.cache_key() != plain.towers[1].cache_key()  # a feature cache never mixes the two
    assert "cambrian1_compat" not in plain.towers[1].config_dict()
    loaded = load_model(compat.save_pretrained(str(tmp_path / "m")))
    assert loaded.model_config["tower_cambrian1_compat"] is True
    assert [t.cambrian1_compat for t in loaded.towers] == [True, True]
