"""Activations stored as `.npy` shards, memory-mapped and read in a deterministic shuffled order.

Each shard is a 2-D [N_i, d] array (float32, or float16 e.g. for bfloat16 activations saved as
float16; rows are converted to float32 on read). The shards are concatenated into one virtual
table of N = Σ N_i rows. Training reads it as in the paper, sampling without replacement within
an epoch:

    global row index   g     = step * batch_size + i        (i = row within the global batch)
    epoch              e     = g // N
    table row                = perm_e[g % N]                 perm_e: seeded permutation of N

so every epoch visits every row exactly once, in a fresh order, and the rows of a step are a pure
function of (step, batch_size, seed): a resumed run, or another process reading its own slice,
sees exactly the same data. Only the pages of the requested rows are read from disk; shards on
an object store (gs://, s3://) are read by byte ranges instead (`saejax.objstore.RangeNpy`), the
rows of one batch from all its shards in one concurrent round of requests.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from saejax.data.order import epoch_order
from saejax.data.source import check_row_request, check_sample_request
from saejax.files import expand_paths
from saejax.objstore import RangeNpy, open_npys, take_rows
from saejax.paths import is_url

# Second word of every seed, so the epoch permutations and sample() never share a stream.
_EPOCH_STREAM, _SAMPLE_STREAM = 0, 1


def open_shard(path: str) -> np.ndarray:
    """Memory-map one shard, checking it is a 2-D array of floats."""
    return open_shards([path])[0]


def open_shards(paths: list[str]) -> list[np.ndarray]:
    """`open_shard` of each path; URLs become `RangeNpy` arrays, their headers read in one
    concurrent round of requests. The first bad file raises."""
    urls = [p for p in paths if is_url(p)]
    remote = dict(zip(urls, open_npys(urls)))
    return [_checked(p, remote[p] if is_url(p) else _memory_map(p)) for p in paths]


def _memory_map(path: str) -> np.ndarray | Exception:
    try:
        return np.load(path, mmap_mode="r")
    except Exception as e:  # not an .npy file, pickled objects, truncated header, ...
        return e


def _checked(path: str, arr) -> np.ndarray:
    """`arr` once it is a 2-D array of floats (an exception from opening it, raised as the
    one-line error naming the file)."""
    if isinstance(arr, Exception):
        how = "read" if is_url(path) else "memory-mapped"
        raise ValueError(f"{path}: cannot be {how} as a .npy array ({arr})") from arr
    if not isinstance(arr, (np.ndarray, RangeNpy)):
        raise ValueError(f"{path}: expected a single .npy array, got {type(arr).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D [rows, d] array, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        hint = (" (bfloat16 saved by np.save reads back as raw bytes; save it as float16 or "
                "float32)" if arr.dtype.kind == "V" else "")
        raise ValueError(f"{path}: expected a float array, got dtype {arr.dtype}{hint}")
    return arr


class ShuffledTable:
    """Rows of a virtual table (2-D shards concatenated) served in the per-epoch shuffled order
    of the module docstring; the shared reader of `NpySource` and the activation store.

    `shards` are array-likes [N_i, d] (typically memory-mapped); `decode`, if given, turns rows
    read from a shard (rows sorted by index) into floats [k, d] (e.g. bfloat16 bits stored as
    uint16 viewed as bfloat16); numpy's assignment converts them to the dtype asked for.
    `batch_dtype`: the dtype of the training rows (`rows`): float32, or bfloat16 for data stored
    so, which then crosses to the devices at half the bytes and is widened there, inside the
    step (exactly: every bfloat16 is a float32). Statistics rows (`sample`) are float32."""

    def __init__(self, shards: list[np.ndarray], d_in: int, seed: int = 0,
                 decode: Callable[[np.ndarray], np.ndarray] | None = None,
                 batch_dtype: np.dtype = np.dtype(np.float32)):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        self.d_in: int = int(d_in)
        self.batch_dtype = np.dtype(batch_dtype)
        self._shards = shards
        self._decode = decode
        lengths = np.array([len(s) for s in shards], np.int64)
        self.n_rows: int = int(lengths.sum())
        """N, the number of rows in one epoch."""
        if self.n_rows == 0:
            raise ValueError("the table holds no rows")
        self._ends = np.cumsum(lengths)
        self._starts = self._ends - lengths

    # -- the ActivationSource interface -------------------------------------------------------

    def rows(self, step: int, start: int, stop: int, batch_size: int) -> np.ndarray:
        """Rows [start, stop) of step `step`'s global batch (see `ActivationSource.rows`), in
        `batch_dtype`."""
        check_row_request(step, start, stop, batch_size)
        return self.gather(self.table_rows(step, start, stop, batch_size), self.batch_dtype)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n rows drawn uniformly without replacement (with replacement only if n > N)."""
        check_sample_request(n, seed)
        rng = np.random.default_rng([self.seed, _SAMPLE_STREAM, seed])
        return self.gather(rng.choice(self.n_rows, size=n, replace=n > self.n_rows))

    def summary_metrics(self, decoder) -> dict:
        """No ground truth to compare a trained decoder with."""
        return {}

    # -- the shuffle ---------------------------------------------------------------------------

    def table_rows(self, step: int, start: int, stop: int, batch_size: int) -> np.ndarray:
        """Indices into the concatenated table of rows [start, stop) of step `step`'s batch."""
        g = step * batch_size + np.arange(start, stop, dtype=np.int64)
        return epoch_order(g, self.n_rows, lambda e: (self.seed, _EPOCH_STREAM, e))

    # -- reading --------------------------------------------------------------------------------

    def gather(self, table_rows: np.ndarray, dtype: np.dtype = np.dtype(np.float32)
               ) -> np.ndarray:
        """[len(table_rows), d] rows of the concatenated table, in the order given, as `dtype`.

        The requested rows are sorted once and each shard is read with its run of sorted row
        indices (sequential-ish page access on the mmap; cost linear in the rows, not in
        rows x shards); the rows are written back to their requested positions. All shards'
        reads go through one `take_rows` call (one round of requests on an object store)."""
        table_rows = np.asarray(table_rows, np.int64)
        out = np.empty((len(table_rows), self.d_in), dtype)
        order = np.argsort(table_rows, kind="stable")
        ordered = table_rows[order]
        shard = np.searchsorted(self._ends, ordered, side="right")
        cuts = np.flatnonzero(np.diff(shard)) + 1
        runs = [(a, b) for a, b in zip(np.concatenate([[0], cuts]),
                                       np.concatenate([cuts, [len(ordered)]])) if a != b]
        blocks = take_rows([(self._shards[shard[a]], ordered[a:b] - self._starts[shard[a]])
                            for a, b in runs])
        for (a, b), block in zip(runs, blocks):
            out[order[a:b]] = block if self._decode is None else self._decode(block)
        return out


class NpySource(ShuffledTable):
    """Rows of one or more memory-mapped .npy shards, shuffled per epoch (see module docstring)."""

    def __init__(self, paths: str | os.PathLike | list[str | os.PathLike], seed: int = 0):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.paths = expand_paths(paths)
        shards = open_shards(self.paths)
        d_in = _common_width(self.paths, shards)
        if sum(len(s) for s in shards) == 0:
            raise ValueError(f"the data files hold no rows: {self.paths}")
        super().__init__(shards, d_in, seed)

    def __repr__(self) -> str:
        return (f"NpySource({len(self.paths)} files, n_rows={self.n_rows}, d_in={self.d_in}, "
                f"seed={self.seed})")


def _common_width(paths: list[str], shards: list[np.ndarray]) -> int:
    """The row width d shared by all shards (error names the first file that disagrees)."""
    d = shards[0].shape[1]
    for path, shard in zip(paths, shards):
        if shard.shape[1] != d:
            raise ValueError(
                f"{path}: shape {shard.shape} has width {shard.shape[1]}, but {paths[0]} has "
                f"shape {shards[0].shape} (width {d}); all files must agree on d")
    return int(d)
