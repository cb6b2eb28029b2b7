"""Batch samplers: length-grouped (reference §C.4, done right) and resumable at any step.

Both yield lists of dataset indices, one list per optimiser micro-step, for *this* rank only. The order of an
epoch depends only on ``(seed, epoch)``, so a run that resumes with :meth:`GroupedBatchSampler.load_state_dict`
replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["GroupedBatchSampler"]


class GroupedBatchSampler:
    """Shuffled batches of ``batch_size`` indices per rank, optionally grouped by length and modality.

    With ``group_by_length`` the epoch's permutation is cut into *mega-batches* of
    ``world_size * batch_size * megabatch_mult`` samples of one modality (with / without image); each mega-batch is
    sorted by length and cut into batches, and the batches are shuffled. Similar lengths then share a batch (little
    padding) while the order stays random. Unlike the seed's sampler, leftovers are not dumped at the end of the
    epoch and the modalities are never mixed inside a batch.

    Args:
        lengths: estimated sequence length of each sample (tokens, image tokens included).
        batch_size: samples per rank per micro-step.
        has_image: per sample, whether it carries an image (modality grouping); ``None`` = all the same.
        world_size / rank: data-parallel layout; each rank gets its own slice of every global batch.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        drop_last: drop the final incomplete global batch (keeps ranks in lock-step; default).
        pad: with ``drop_last=False``, fill each modality's last global batch with samples of that modality from
            the start of the epoch (default: every rank gets a full batch of one modality); ``False`` merges the
            leftovers into short trailing batches, so every sample is seen exactly once (with several ranks a
            short share may be empty). ``exact_batches`` gives a padded sampler's batches without the repeats.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        has_image: Sequence[bool] | np.ndarray | None = None,
        group_by_length: bool = True,
        shuffle: bool = True,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        megabatch_mult: int = 16,
        drop_last: bool = True,
        pad: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.has_image = (
            np.zeros(len(self.lengths), dtype=bool)
            if has_image is None
            else np.asarray(has_image, dtype=bool)
        )
        if len(self.has_image) != len(self.lengths):
            raise ValueError("has_image and lengths must have the same length")
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.shuffle = shuffle
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.megabatch_mult = megabatch_mult
        self.drop_last = drop_last
        self.pad = pad
        self.epoch = 0
        self.start_batch = 0  # batches of the current epoch already consumed (resume)
        if len(self) == 0:
            n_img = int(self.has_image.sum())
            mixed = (
                f": {n_img} with images and {len(self.has_image) - n_img} text-only, and each batch holds one "
                "kind"
                if 0 < n_img < len(self.has_image)
                else ""
            )
            raise ValueError(
                f"{len(self.lengths)} samples cannot fill one global batch of {self.global_batch} "
                f"(batch_size {batch_size} x world_size {world_size}){mixed}; lower the batch size or add data"
            )

    @property
    def global_batch(self) -> int:
        """Samples per micro-step across all ranks."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return len(self._global_batches(self.epoch, count_only=True))

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch = epoch
        self.start_batch = 0

    def left_out(self) -> dict[str, int]:
        """Samples each epoch leaves out with ``drop_last``, by modality (``{"image": n, "text": m}``): the
        remainder of each modality's count modulo the global batch, drawn at random every epoch."""
        if not self.drop_last:
            return {"image": 0, "text": 0}
        n_img = int(self.has_image.sum())
        n_txt = len(self.has_image) - n_img
        return {"image": n_img % self.global_batch, "text": n_txt % self.global_batch}

    def _layout(self) -> dict[str, int]:
        """What a saved position (an epoch's batches consumed) only means under: the epoch's batches."""
        return {
            "samples": len(self.lengths),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "group_by_length": int(self.group_by_length),
            "shuffle": int(self.shuffle),
        }

    def state_dict(self, consumed_batches: int) -> dict[str, int]:
        """Position to resume from: the epoch and how many of its batches the trainer has consumed, with the
        layout that makes those batches."""
        return {
            "epoch": self.epoch,
            "consumed_batches": consumed_batches,
            "seed": self.seed,
            **self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position (the next ``__iter__`` skips the consumed batches).

        Raises:
            ValueError: the state was saved under another seed or batch layout (its position would then skip
                some samples of the epoch and repeat others).
        """
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        changed = [
            f"{key} {int(state[key])} -> {value}"
            for key, value in self._layout().items()
            if key in state and int(state[key]) != value  # (checkpoints of older versions lack the layout)
        ]
        if changed:
            raise ValueError(
                f"the checkpoint's data position counts batches of another layout ({'; '.join(changed)}): "
                "resuming would skip some samples of the epoch and repeat others. Resume with the checkpoint's "
                "data.batch_size, number of processes and training data (lower memory with "
                "schedule.gradient_checkpointing or a smaller data.max_length; schedule.grad_accum may change), or "
                "start a new run without --resume"
            )
        self.epoch = int(state["epoch"])
        self.start_batch = int(state["consumed_batches"])

    def _global_batches(self, epoch: int, count_only: bool = False) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + epoch)
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        gb = self.global_batch
        batches: list[np.ndarray] = []
        for modality in (True, False):
            idx = order[self.has_image[order] == modality]
            if (
                self.drop_last
            ):  # the remainder left out is random (a fresh draw each epoch), never the shortest
                idx = idx[: len(idx) - len(idx) % gb]
            if self.group_by_length and len(idx):
                mega = gb * self.megabatch_mult
                for start in range(0, len(idx), mega):
                    chunk = idx[start : start + mega]
                    chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                    batches += [chunk[i : i + gb] for i in range(0, len(chunk), gb)]
            else:
                batches += [idx[i : i + gb] for i in range(0, len(idx), gb)]
        full = [b for b in batches if len(b) == gb]
        partial = [b for b in batches if len(b) < gb]
        if not self.drop_last and self.pad:
            # each modality's leftover is filled with samples of its own modality (wrapping around them), so
            # every rank runs the same modules in a global batch (sharded runners gather weights in lock-step)
            for b in partial:
                same = order[self.has_image[order] == self.has_image[b[0]]]
                full.append(np.concatenate([b, np.resize(same, gb - len(b))]))
        elif not self.drop_last and partial:
            # one process: the modality leftovers share trailing batches, every sample exactly once
            rest = np.concatenate(partial)
            full += [rest[i : i + gb] for i in range(0, len(rest), gb)]
        if count_only:
            return full
        if self.shuffle:
            perm = rng.permutation(len(full))
            full = [full[i] for i in perm]
        return full

    def exact_batches(self) -> list[tuple[list[int], bool]]:
        """This rank's batches of the current epoch with the padding taken out, for an exact held-out metric.

        Every sample of the split is counted once across all ranks: a padded entry (a repeat of a sample already
        placed, in the order of the global batches) is dropped from its rank's share. A share left with no sample
        keeps its repeats and is marked ``counts=False``: the rank runs the forward with the others (sharded
        runners gather weights in lock-step) and discards the result. Returns ``[(indices, counts), ...]``.
        """
        seen: set[int] = set()
        out = []
        for gbatch in self._global_batches(self.epoch):
            first = []
            for i in gbatch.tolist():
                first.append(i not in seen)
                seen.add(i)
            share = list(range(self.rank, len(first), self.world_size))
            real = [int(gbatch[k]) for k in share if first[k]]
            out.append((real, True) if real else ([int(gbatch[k]) for k in share], False))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches(self.epoch)
        start, self.start_batch = self.start_batch, 0
        for gbatch in batches[start:]:
            # strided split keeps each rank's share of a length-sorted batch similar in length
            yield gbatch[self.rank :: self.world_size].tolist()
