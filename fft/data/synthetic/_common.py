"""Shared helpers of the synthetic world: seeded streams, split membership, sampling, text joining.

Every part of the world draws from its own `random.Random` seeded from `(seed, part, ...)`, so
adding a part never shifts another part's output. Train/test disjointness is by construction: an
item (a document, an instruction input) belongs to the test split iff a stable hash of its text
falls in the test bucket; each split's generator rejects items of the other split.
"""

from __future__ import annotations

import bisect
import random
import zlib
from collections.abc import Sequence

SPLITS = ("train", "test")


def make_rng(seed: int, *parts: object) -> random.Random:
    """A `random.Random` seeded deterministically from `seed` and a path of part names.

    String seeds are hashed with sha512 by `random` (not Python's salted `hash`), so the stream is
    identical across processes and machines.
    """
    return random.Random("/".join([str(seed), *map(str, parts)]))


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def stable_hash(text: str) -> int:
    """crc32 of the utf-8 text: stable across processes (unlike `hash`)."""
    return zlib.crc32(text.encode("utf-8"))


def split_of(text: str, test_every: int = 4) -> str:
    """The split an item belongs to: 'test' for one hash bucket in `test_every`, else 'train'."""
    return "test" if stable_hash(text) % test_every == 0 else "train"


class Zipf:
    """Samples items with Zipfian weights (rank r gets weight 1 / (r + 2) ** a)."""

    def __init__(self, items: Sequence, a: float = 1.0):
        self.items = list(items)
        if not self.items:
            raise ValueError("Zipf needs at least one item")
        cum, total = [], 0.0
        for r in range(len(self.items)):
            total += 1.0 / (r + 2) ** a
            cum.append(total)
        self.cum, self.total = cum, total

    def __call__(self, rng: random.Random):
        i = bisect.bisect_right(self.cum, rng.random() * self.total)
        return self.items[min(i, len(self.items) - 1)]


def weighted(rng: random.Random, cum: list[float]) -> int:
    """Index drawn from cumulative weights `cum`."""
    return min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)


def join_tokens(tokens: Sequence[str]) -> str:
    """Join tokens into text: punctuation attaches to the previous word, first letter upper."""
    text = " ".join(tokens).replace(" .", ".").replace(" ,", ",").replace(" ?", "?")
    return text[:1].upper() + text[1:]
