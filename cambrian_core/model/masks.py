"""Where the real image lies on a square token grid after expand-to-square (reference §B.6).

``expand_to_square`` pastes a ``w x h`` image centred on a ``max(w, h)`` square. A grid cell of side ``s``
is *real* when it overlaps the pasted image; rows and columns that overlap only padding are dropped by
unpadding. The kept cells always form one rectangle, so an image's extent is four numbers.
"""

from __future__ import annotations

import torch

__all__ = ["grid_masks", "real_extents"]


def real_extents(image_sizes: torch.Tensor | None, side: int, n: int | None = None) -> torch.Tensor:
    """Rows and columns of a ``side x side`` grid that overlap the real image.

    Args:
        image_sizes: ``[N, 2]`` original ``(width, height)`` of each image, or ``None`` (all square).
        side: side of the token grid.
        n: number of images (only needed when ``image_sizes`` is ``None``).

    Returns:
        ``[N, 4]`` long tensor ``(row0, row1, col0, col1)``, end-exclusive.
    """
    if image_sizes is None:
        if n is None:
            raise ValueError("real_extents needs `n` when image_sizes is None")
        return torch.tensor([[0, side, 0, side]], dtype=torch.long).repeat(n, 1)
    sizes = torch.as_tensor(image_sizes, dtype=torch.long).reshape(-1, 2).cpu()
    if sizes.shape[0] <= _FEW:  # a few images (serving): integer arithmetic beats ~20 tiny tensor ops
        pairs = sizes.tolist()
        if any(v <= 0 for pair in pairs for v in pair):
            raise ValueError(f"image_sizes must be positive (width, height) pairs, got {pairs}")
        rows = []
        for width, height in pairs:
            square = max(width, height)
            rows.append([*_span(height, square, side), *_span(width, square, side)])
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
    if (sizes <= 0).any():
        raise ValueError(f"image_sizes must be positive (width, height) pairs, got {sizes.tolist()}")
    w, h = sizes[:, 0], sizes[:, 1]
    square = torch.maximum(w, h)

    def span(length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = (square - length) // 2  # expand_to_square pastes at ((S - w) // 2, (S - h) // 2)
        first = (pad * side) // square  # first cell whose end passes the padding
        end = -((-(pad + length) * side) // square)  # ceil: first cell starting at or after the image end
        return first, end

    r0, r1 = span(h)
    c0, c1 = span(w)
    return torch.stack([r0, r1, c0, c1], dim=1)


#: up to this many images, extents are computed with Python integers
_FEW = 8


def _span(length: int, square: int, side: int) -> tuple[int, int]:
    """First and end cell (exclusive) of a ``length`` pasted centred on ``square``, on ``side`` cells."""
    pad = (square - length) // 2
    return (pad * side) // square, -((-(pad + length) * side) // square)


def grid_masks(extents: torch.Tensor, side: int) -> torch.Tensor:
    """``[N, side*side]`` boolean masks (``True`` = real cell, row-major) from ``real_extents`` output."""
    idx = torch.arange(side, device=extents.device)
    rows = (idx >= extents[:, 0:1]) & (idx < extents[:, 1:2])
    cols = (idx >= extents[:, 2:3]) & (idx < extents[:, 3:4])
    return (rows[:, :, None] & cols[:, None, :]).reshape(extents.shape[0], side * side)
