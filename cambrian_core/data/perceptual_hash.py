"""Perceptual image hashes (pHash, dHash) on PIL + numpy, and a near-duplicate index over them.

pHash: grey 32x32 thumbnail, 2-D DCT-II, the 8x8 lowest frequencies, one bit per coefficient above their median
(DC excluded from the median). dHash: grey 9x8 thumbnail, one bit per "left pixel brighter than its right
neighbour". Both give 64-bit integers compared by Hamming distance; re-encoding, resizing and mild brightness
changes move a hash by a few bits, different images by ~32.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from functools import lru_cache

import numpy as np
from PIL import Image

__all__ = ["NearDuplicateIndex", "dhash", "hamming", "phash"]


@lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def _grey(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("L").resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def _bits_to_int(bits: np.ndarray) -> int:
    return int("".join("1" if b else "0" for b in bits.ravel()), 2)


def phash(image: Image.Image, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """64-bit (for ``hash_size=8``) DCT perceptual hash of ``image``."""
    n = hash_size * highfreq_factor
    pixels = _grey(image, (n, n))
    d = _dct_matrix(n)
    low = (d @ pixels @ d.T)[:hash_size, :hash_size]
    median = np.median(low.ravel()[1:])
    return _bits_to_int(low > median)


def dhash(image: Image.Image, hash_size: int = 8) -> int:
    """64-bit (for ``hash_size=8``) difference hash of ``image``."""
    pixels = _grey(image, (hash_size + 1, hash_size))
    return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])


def hamming(a: int, b: int) -> int:
    """Number of differing bits."""
    return (a ^ b).bit_count()


class NearDuplicateIndex:
    """Finds a stored 64-bit hash within ``max_distance`` bits of a query, without comparing against all.

    Pigeonhole: split each hash into ``max_distance + 1`` bit bands; two hashes within ``max_distance`` bits agree
    exactly on at least one band, so only hashes sharing a band value are compared.
    """

    def __init__(self, max_distance: int = 4, bits: int = 64) -> None:
        if not 0 <= max_distance < bits:
            raise ValueError(f"max_distance must be in [0, {bits}), got {max_distance}")
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = [round(i * bits / bands) for i in range(bands + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in itertools.pairwise(edges)]
        self._buckets: list[dict[int, dict[int, tuple[int, object]]]] = [
            defaultdict(dict) for _ in self._bands
        ]
        self._count = 0

    def find_all(self, value: int) -> list[tuple[object, int]]:
        """``(key, distance)`` of every stored hash within ``max_distance``, closest first."""
        hits: dict[int, tuple[object, int]] = {}
        for (shift, mask), buckets in zip(self._bands, self._buckets, strict=True):
            for n, (other, key) in buckets.get((value >> shift) & mask, {}).items():
                if n not in hits:
                    dist = hamming(value, other)
                    if dist <= self.max_distance:
                        hits[n] = (key, dist)
        return sorted(hits.values(), key=lambda kd: kd[1])

    def find(self, value: int) -> tuple[object, int] | None:
        """``(key, distance)`` of the closest stored hash within ``max_distance``, else ``None``."""
        hits = self.find_all(value)
        return hits[0] if hits else None

    def add(self, value: int, key: object) -> None:
        """Store ``value`` under ``key``."""
        n, self._count = self._count, self._count + 1
        for (shift, mask), buckets in zip(self._bands, self._buckets, strict=True):
            buckets[(value >> shift) & mask][n] = (value, key)

    def __len__(self) -> int:
        return self._count
