"""``StagedTokens``: a multi-stage tower's output whose small stages are projected before they are enlarged."""

from __future__ import annotations

import pytest
import torch

from cambrian_core.model.encoder import StagedTokens, resize_map


def _maps(dtype=torch.float64, grad=False, batch=2):
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 12, 12), (3, 6, 6), (4, 3, 3), (6, 2, 2)]  # shrunk, equal, enlarged (3 -> 6, 2 -> 6)
    return [torch.randn(batch, *s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes]


def test_from_maps_shrinks_large_stages_merges_them_and_keeps_small_ones():
    staged = StagedTokens.from_maps(_maps(), 6)
    assert [tuple(p.shape) for p in staged.parts] == [(2, 8, 6, 6), (2, 4, 3, 3), (2, 6, 2, 2)]
    assert staged.shape == (2, 36, 18) and staged.dtype == torch.float64
    want = torch.cat([resize_map(m, 6) for m in _maps()], dim=-1)
    torch.testing.assert_close(staged.tokens(), want, rtol=0, atol=0)
    backwards = StagedTokens.from_maps(_maps()[::-1], 6)  # only adjacent output-grid stages are merged
    assert [tuple(p.shape) for p in backwards.parts] == [(2, 6, 2, 2), (2, 4, 3, 3), (2, 8, 6, 6)]
    want = torch.cat([resize_map(m, 6) for m in _maps()[::-1]], dim=-1)
    torch.testing.assert_close(backwards.tokens(), want, rtol=0, atol=0)


LAYOUTS = {  # which of _maps() a tower hands over, in which order
    "large first": [0, 1, 2, 3],
    "small first": [3, 2, 1, 0],
    "output grid only": [0, 1],
    "small only": [2, 3],
}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_project_equals_the_projection_of_the_tokens_values_and_gradients(batch, bias, layout):
    torch.manual_seed(0)
    maps = [_maps(grad=True, batch=batch)[k] for k in LAYOUTS[layout]]
    lin = torch.nn.Linear(sum(m.shape[1] for m in maps), 7, bias=bias).double()
    staged = StagedTokens.from_maps(maps, 6)
    got = staged.project(lin)
    want = lin(staged.tokens())
    assert got.shape == (batch, 36, 7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    wrt = [*maps, *lin.parameters()]
    for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 2])
def test_project_under_bf16_autocast_returns_the_products_dtype(batch):
    lin = torch.nn.Linear(18, 7)
    staged = StagedTokens.from_maps(_maps(torch.float32, batch=batch), 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = staged.project(lin), lin(staged.tokens())
    assert got.dtype == want.dtype == torch.bfloat16
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2


def test_to_and_bad_widths():
    staged = StagedTokens.from_maps(_maps(), 6).to(dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in staged.parts) and staged.side == 6
    with pytest.raises(ValueError, match=r"widths \[8, 4, 6\] \(sum 18\) with a Linear of 20 inputs"):
        staged.project(torch.nn.Linear(20, 4))


def test_cat_batches_images_of_one_layout():
    a, b = StagedTokens.from_maps(_maps(batch=2), 6), StagedTokens.from_maps(_maps(batch=1), 6)
    both = StagedTokens.cat([a, b])
    assert both.layout == a.layout == ((8, 6, 6), (4, 3, 3), (6, 2, 2)) and both.shape == (3, 36, 18)
    torch.testing.assert_close(both.tokens(), torch.cat([a.tokens(), b.tokens()]), rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"cannot batch StagedTokens of layouts .* \(side 6\) and .* \(side 3\)"
    ):
        StagedTokens.cat([a, StagedTokens.from_maps(_maps(batch=1), 3)])
    with pytest.raises(ValueError, match="at least one"):
        StagedTokens.cat([])


def test_a_runner_moves_and_casts_staged_features_in_a_batch():
    from cambrian_core.train.runners.base import move_to

    staged = StagedTokens.from_maps(_maps(torch.float32), 6)
    batch = {
        "tower_features": [torch.ones(2, 36, 5), staged],
        "input_ids": torch.ones(2, 3, dtype=torch.long),
    }
    moved = move_to(batch, torch.device("cpu"), torch.bfloat16)
    assert isinstance(moved["tower_features"][1], StagedTokens)
    assert [p.dtype for p in moved["tower_features"][1].parts] == [torch.bfloat16] * 3
    assert moved["tower_features"][0].dtype == torch.bfloat16 and moved["input_ids"].dtype == torch.long


@pytest.mark.gpu
def test_a_cuda_data_loader_pins_staged_features():
    from torch.utils.data import DataLoader

    staged = StagedTokens.from_maps(_maps(torch.float32), 6)
    (batch,) = DataLoader([staged], batch_size=None, pin_memory=True)
    assert isinstance(batch, StagedTokens) and all(p.is_pinned() for p in batch.parts)
    moved = batch.to("cuda", non_blocking=True)
    torch.testing.assert_close(moved.tokens().cpu(), staged.tokens())
