"""Batch assembly: dynamic padding (to the longest row, not to ``max_length``) and optional packing.

Images are flattened across the batch in the order their ``IMAGE_TOKEN_INDEX`` sentinels appear (row by row),
which is the order the composed model splices them back in. With packing, several samples share one row: the
``attention_mask`` then holds the sample number (1, 2, ...; 0 = padding) so attention stays inside each sample,
and ``position_ids`` restart at 0 for each sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cambrian_core.model.encoder import StagedTokens
from cambrian_core.train.data import IGNORE_INDEX, Skipped

__all__ = ["Collator", "pack_rows"]


def _cat(xs: list[Any]) -> Any:
    """One tower's images of the batch in one tensor (or one ``StagedTokens`` from a staged feature cache)."""
    return StagedTokens.cat(xs) if isinstance(xs[0], StagedTokens) else torch.cat(xs)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: sample positions grouped into rows of at most ``capacity`` tokens.

    A sample longer than ``capacity`` gets a row of its own (the dataset already truncated it).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])  # rows in input order


class Collator:
    """Turns dataset samples into one model batch.

    Args:
        pad_token_id: id used for padding ``input_ids``.
        packing: pack several samples per row (first-fit decreasing within the batch).
        max_length: row capacity in LLM tokens (image tokens included) when packing.
        pad_to_multiple_of: round the padded length up (8 suits tensor cores; 1 = exact).
    """

    def __init__(
        self, pad_token_id: int, packing: bool = False, max_length: int = 2048, pad_to_multiple_of: int = 1
    ) -> None:
        self.pad_token_id = int(pad_token_id)
        self.packing = packing
        self.max_length = max_length
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def __call__(self, items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
        skipped = [s for s in items if isinstance(s, Skipped)]
        samples = [s for s in items if not isinstance(s, Skipped)]
        batch: dict[str, Any] = {"skipped": skipped, "num_samples": len(samples)}
        if not samples:
            return batch
        if self.packing:
            rows = [
                [samples[i] for i in row]
                for row in pack_rows([s["length"] for s in samples], self.max_length)
            ]
        else:
            rows = [[s] for s in samples]
        ids = [torch.cat([s["input_ids"] for s in row]) for row in rows]
        labels = [torch.cat([s["labels"] for s in row]) for row in rows]
        width = max(len(x) for x in ids)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(rows)
        batch["input_ids"] = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        batch["labels"] = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        batch["attention_mask"] = torch.zeros((n, width), dtype=torch.long)
        if self.packing:
            batch["position_ids"] = torch.zeros((n, width), dtype=torch.long)
        for r, row in enumerate(rows):
            batch["input_ids"][r, : len(ids[r])] = ids[r]
            batch["labels"][r, : len(labels[r])] = labels[r]
            start = 0
            for k, s in enumerate(row):
                end = start + len(s["input_ids"])
                batch["attention_mask"][r, start:end] = k + 1 if self.packing else 1
                if self.packing:
                    batch["position_ids"][r, start:end] = torch.arange(end - start)
                start = end
        ordered = [s for row in rows for s in row]  # image order = sentinel order, row by row
        batch["image_sizes"] = torch.cat([s["image_sizes"] for s in ordered])
        for key in ("pixel_values", "tower_features"):
            per_tower = list(zip(*(s[key] for s in ordered if key in s), strict=True))
            if per_tower and any(x is not None for x in per_tower[0]):  # text-only batches carry no images
                batch[key] = [_cat([x for x in tower if x is not None]) for tower in per_tower]
        batch["indices"] = [s["index"] for s in ordered]
        batch["sample_lengths"] = [int(s["length"]) for s in ordered]  # LLM tokens, image tokens included
        batch["num_tokens"] = sum(batch["sample_lengths"])
        batch["num_target_tokens"] = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in ordered)
        return batch
