"""Splice image blocks into token sequences at each sample's own ``<image>`` sentinels (reference §B.6).

Every sentinel (``IMAGE_TOKEN_INDEX``) is replaced, at its own position, by its image's block: the real rows
of the ``f x f`` token grid, each followed by the learned newline token. Input padding is dropped and the
expanded sequences are padded again (right for training, left for batched generation). All index
arithmetic is vectorised; no Python loop runs over samples or images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cambrian_core.model.tokenize import IGNORE_INDEX, IMAGE_TOKEN_INDEX

__all__ = ["ImageBlocks", "SplicedBatch", "build_image_blocks", "splice"]


@dataclass
class ImageBlocks:
    """The image blocks of a batch, concatenated in image order."""

    embeds: torch.Tensor  #: [T, H] every block token
    lengths: torch.Tensor  #: [N_img] tokens per block (long, on the embeds' device)
    #: [T] index into the flattened ``[N_img * f * f]`` grid; -1 marks a newline token (``None``: not asked for)
    cells: torch.Tensor | None


@dataclass
class SplicedBatch:
    """Expanded, re-padded sequences ready for the LLM, plus where each image token landed."""

    inputs_embeds: torch.Tensor  #: [B, L', H]
    attention_mask: torch.Tensor  #: [B, L'] long
    position_ids: torch.Tensor  #: [B, L'] long
    labels: torch.Tensor | None  #: [B, L'] with IGNORE_INDEX over image blocks and padding
    image_batch: torch.Tensor  #: [T] sample index of each image-block token
    image_pos: torch.Tensor  #: [T] sequence position of each image-block token


def _ranges(lengths: torch.Tensor) -> torch.Tensor:
    """``[2, 3] -> [0, 1, 0, 1, 2]``: position inside each run."""
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    return torch.arange(total, device=lengths.device) - torch.repeat_interleave(
        starts, lengths, output_size=total
    )


#: up to this many images, blocks are cut by slicing each image's grid (fewer, larger tensor ops)
_FEW = 8


def build_image_blocks(
    tokens: torch.Tensor, newline: torch.Tensor, extents: torch.Tensor, with_cells: bool = True
) -> ImageBlocks:
    """Cut each image's real rectangle out of its grid and end every row with ``newline``.

    Args:
        tokens: ``[N, f*f, H]`` connector output (row-major grid).
        newline: ``[H]`` learned row terminator.
        extents: ``[N, 4]`` ``(row0, row1, col0, col1)`` kept on the ``f x f`` grid (see ``masks.real_extents``).
        with_cells: also return each token's grid cell (the in-LLM samplers need it).
    """
    n, cells, hidden = tokens.shape
    side = round(cells**0.5)
    if n <= _FEW:
        return _blocks_by_slicing(tokens, newline, extents, side, with_cells)
    ext = extents.to(tokens.device)
    rows, cols = ext[:, 1] - ext[:, 0], ext[:, 3] - ext[:, 2]
    lengths = rows * (cols + 1)
    local = _ranges(lengths)  # position inside the block
    image = torch.repeat_interleave(torch.arange(n, device=tokens.device), lengths, output_size=local.numel())
    width = (cols + 1)[image]
    r, c = local // width, local % width
    is_newline = c == width - 1
    cell = image * cells + (ext[image, 0] + r) * side + ext[image, 2] + c
    cell = torch.where(is_newline, torch.full_like(cell, -1), cell)
    flat = tokens.reshape(n * cells, hidden)
    picked = flat[cell.clamp(min=0)]
    embeds = torch.where(is_newline[:, None], newline.to(flat.dtype).expand_as(picked), picked)
    return ImageBlocks(embeds=embeds, lengths=lengths, cells=cell if with_cells else None)


def _blocks_by_slicing(
    tokens: torch.Tensor, newline: torch.Tensor, extents: torch.Tensor, side: int, with_cells: bool
) -> ImageBlocks:
    """``build_image_blocks`` for a few images: one slice and one concatenation per image."""
    n, cells, hidden = tokens.shape
    grid = tokens.view(n, side, side, hidden)
    line = newline.to(tokens.dtype)
    device = tokens.device
    pieces, lengths, cell_parts = [], [], []
    for i, (r0, r1, c0, c1) in enumerate(extents.tolist()):
        rows = r1 - r0
        pieces.append(
            torch.cat([grid[i, r0:r1, c0:c1], line.expand(rows, 1, hidden)], dim=1).reshape(-1, hidden)
        )
        lengths.append(rows * (c1 - c0 + 1))
        if with_cells:
            cell = torch.arange(r0, r1, device=device)[:, None] * side + torch.arange(
                c0, c1 + 1, device=device
            )
            cell = cell + i * cells
            cell[:, -1] = -1
            cell_parts.append(cell.reshape(-1))
    embeds = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return ImageBlocks(
        embeds=embeds,
        lengths=torch.tensor(lengths, dtype=torch.long, device=device),
        cells=(torch.cat(cell_parts) if cell_parts else None) if with_cells else None,
    )


def _sentinel_error(n_sentinels: int, per_sample: list[int], n_images: int) -> ValueError:
    return ValueError(
        f"the batch has {n_sentinels} <image> sentinels (per sample: {per_sample}) but {n_images} images; "
        "pass one image per IMAGE_TOKEN_INDEX, in sample order"
    )


def _splice_one_sequence(
    input_ids: torch.Tensor, text_embeds: torch.Tensor, blocks: ImageBlocks | None
) -> SplicedBatch:
    """``splice`` for one unpadded sequence without labels or given positions (a single inference request)."""
    device = input_ids.device
    ids = input_ids[0].tolist()
    sentinels = [j for j, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    n_images = 0 if blocks is None else blocks.lengths.numel()
    if len(sentinels) != n_images:
        raise _sentinel_error(len(sentinels), [len(sentinels)], n_images)
    no_images = torch.zeros(0, dtype=torch.long, device=device)
    if not n_images:
        embeds, image_pos = text_embeds, no_images
    else:
        lengths = blocks.lengths.tolist()
        pieces, positions = [], []
        prev = cursor = offset = 0
        for j, length in zip(sentinels, lengths, strict=True):
            pieces.append(text_embeds[0, prev:j])
            cursor += j - prev
            pieces.append(blocks.embeds[offset : offset + length].to(text_embeds.dtype))
            positions.append(torch.arange(cursor, cursor + length, device=device))
            cursor, offset, prev = cursor + length, offset + length, j + 1
        pieces.append(text_embeds[0, prev:])
        embeds = torch.cat(pieces)[None]
        image_pos = torch.cat(positions) if len(positions) > 1 else positions[0]
    length = embeds.shape[1]
    return SplicedBatch(
        inputs_embeds=embeds,
        attention_mask=torch.ones(1, length, dtype=torch.long, device=device),
        position_ids=torch.arange(length, device=device)[None],
        labels=None,
        image_batch=torch.zeros_like(image_pos),
        image_pos=image_pos,
    )


def splice(
    input_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    blocks: ImageBlocks | None = None,
    padding_side: Literal["right", "left"] = "right",
) -> SplicedBatch:
    """Replace each sentinel by its image block and re-pad.

    Args:
        input_ids: ``[B, L]`` with one ``IMAGE_TOKEN_INDEX`` per image (images numbered in sample order).
        text_embeds: ``[B, L, H]`` embeddings of ``input_ids`` (sentinel rows are ignored).
        attention_mask: ``[B, L]``; 0 marks input padding, which is dropped.
        labels: ``[B, L]`` targets or ``None``.
        position_ids: ``[B, L]`` or ``None``. When given, a 0 starts a new packed segment and positions
            restart there; otherwise positions count the real tokens of each sample from 0.
        blocks: the batch's image blocks (``None`` when it has no image).
        padding_side: where the new padding goes.

    Raises:
        ValueError: the sentinel count differs from the number of image blocks, or a sentinel is padding.
    """
    bsz, length = input_ids.shape
    device = input_ids.device
    if (
        bsz == 1
        and labels is None
        and position_ids is None
        and (attention_mask is None or attention_mask.all())
    ):
        return _splice_one_sequence(input_ids, text_embeds, blocks)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    sentinel = input_ids == IMAGE_TOKEN_INDEX
    if (sentinel & ~valid).any():
        raise ValueError(
            "an <image> sentinel (IMAGE_TOKEN_INDEX) sits in a padded position (attention_mask=0)"
        )
    n_images = 0 if blocks is None else blocks.lengths.numel()
    n_sentinels = int(sentinel.sum())
    if n_sentinels != n_images:
        raise _sentinel_error(n_sentinels, sentinel.sum(1).tolist(), n_images)
    tok_len = valid.long()
    if n_images:
        tok_len = tok_len.masked_scatter(sentinel, blocks.lengths.to(device))
    new_len = tok_len.sum(1)
    out_len = int(new_len.max()) if bsz else 0
    offset = (out_len - new_len) if padding_side == "left" else torch.zeros_like(new_len)
    start = torch.cumsum(tok_len, 1) - tok_len + offset[:, None]

    # positions: restart at each segment start (first real token, or a 0 in the given position_ids)
    idx = torch.arange(length, device=device).expand(bsz, length)
    first_valid = valid & (torch.cumsum(valid.long(), 1) == 1)
    seg_start = first_valid if position_ids is None else first_valid | (valid & (position_ids == 0))
    first = torch.where(seg_start, idx, torch.zeros_like(idx)).cummax(1).values
    seg_origin = start.gather(1, first)

    hidden = text_embeds.shape[-1]
    embeds = text_embeds.new_zeros(bsz, out_len, hidden)
    new_pos = torch.zeros(bsz, out_len, dtype=torch.long, device=device)
    new_labels = None if labels is None else torch.full_like(new_pos, IGNORE_INDEX)
    tb, tj = torch.nonzero(valid & ~sentinel, as_tuple=True)
    dest = start[tb, tj]
    embeds = embeds.index_put((tb, dest), text_embeds[tb, tj])
    new_pos[tb, dest] = dest - seg_origin[tb, tj]
    if new_labels is not None:
        new_labels[tb, dest] = labels[tb, tj]

    image_batch = image_pos = torch.zeros(0, dtype=torch.long, device=device)
    if n_images:
        ib, ij = torch.nonzero(sentinel, as_tuple=True)  # row-major = sample order, then position
        lengths = blocks.lengths.to(device)
        total = int(lengths.sum())
        image_batch = torch.repeat_interleave(ib, lengths, output_size=total)
        image_pos = torch.repeat_interleave(start[ib, ij], lengths, output_size=total) + _ranges(lengths)
        embeds = embeds.index_put((image_batch, image_pos), blocks.embeds.to(embeds.dtype))
        origin = torch.repeat_interleave(seg_origin[ib, ij], lengths, output_size=total)
        new_pos[image_batch, image_pos] = image_pos - origin
    span = torch.arange(out_len, device=device)[None, :]
    new_mask = ((span >= offset[:, None]) & (span < (offset + new_len)[:, None])).long()
    return SplicedBatch(embeds, new_mask, new_pos, new_labels, image_batch, image_pos)
