"""The one step-indexed epoch order: items of a stream of epochs, each a seeded permutation.

Stream position q is item `permutation(epoch_seed(e), n)[q % n]` of epoch e = q // n, so the
item at any position is a pure function of the position (no iterator state to save). Each
caller keeps its own seed words (`epoch_seed`), which is what keeps its stream bit-identical to
the one it drew before they shared this code.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np


@functools.lru_cache(maxsize=2)  # a batch straddles at most one epoch boundary
def permutation(seed_words: tuple[int, ...], n: int) -> np.ndarray:
    """A permutation of range(n) seeded by `seed_words`, read-only (cached: drawing it is O(n)).

    Shuffling an int32 arange in place gives the same order as rng.permutation(n) at half the
    memory, which matters for tables of 10^8+ rows."""
    perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    np.random.default_rng(list(seed_words)).shuffle(perm)
    perm.flags.writeable = False
    return perm


def epoch_order(positions: np.ndarray, n: int,
                epoch_seed: Callable[[int], tuple[int, ...]]) -> np.ndarray:
    """int64 items at stream `positions` (epoch e is `permutation(epoch_seed(e), n)`)."""
    q = np.asarray(positions, np.int64)
    epoch, offset = np.divmod(q, n)
    out = np.empty_like(q)
    for e in np.unique(epoch):
        where = epoch == e
        out[where] = permutation(epoch_seed(int(e)), n)[offset[where]]
    return out
