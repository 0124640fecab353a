"""What the on-disk datasets need from object stores beyond the path layer (`saejax.paths`):
whole-object uploads, sizes and removal, chunked reads, and .npy arrays read by byte ranges.

Every function takes a local path or a URL (gs://, s3://). A local path goes the way it always
went (os, shutil, np.load with mmap); only a URL takes the object-store branch, through fsspec,
the engine beneath `etils.epath`.

`RangeNpy` stands in for a memory-mapped .npy array on an object store: it reads the header
once and then only the rows asked for, with ranged GETs. Neighbouring rows are fetched as one
range, the smallest gaps between rows bridged (each at most `MAX_GAP`, in all at most `SLACK`
times the bytes asked for), and `take_rows` issues the ranges of several arrays (every shard a
shuffled batch touches) as one concurrent round of requests. Reading ahead of the consumer is
the training loop's: `saejax.data.prefetch.Prefetcher` builds the next steps' batches on a
thread while the current step runs. Shuffled rows from an object store stay bound by requests
(a row per request where rows are sparse in the store): for long training runs on one store,
a local copy (memory-mapped) is the fast path.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from saejax.paths import as_path, is_url

MAX_GAP = 1 << 20
"""Two rows at most this many bytes apart may be read as one range, the bytes between them
read and dropped: a request costs tens of milliseconds before its first byte, about the time
to transfer a megabyte."""
SLACK = 3
"""The bytes dropped per read stay at most SLACK times the bytes asked for (the smallest gaps
are bridged first), which bounds memory and transfer at (1 + SLACK) times the rows read."""
_HEADER_PROBE = 4096
"""Bytes read to find a .npy header: np.save pads it to 128 bytes for ordinary arrays, so one
read of this size gets it; a longer header costs a second read."""


def _fs(url: str):
    """(fsspec filesystem, path without scheme) of a URL; `as_path` first, which checks the
    storage client is installed and turns fsspec's listing cache off."""
    import fsspec

    as_path(url)
    return fsspec.core.url_to_fs(url)


# -- whole files ------------------------------------------------------------------------------


def upload(local: str | os.PathLike, url: str) -> None:
    """Copy the local file `local` to the object `url` in one upload: the object appears whole
    when it completes, or not at all (a failed multipart upload is aborted)."""
    fs, path = _fs(url)
    fs.put_file(os.fspath(local), path)


@contextlib.contextmanager
def staged_upload(url: str) -> Iterator[BinaryIO]:
    """A local temporary file to write the object `url` through; uploaded in one piece when the
    block ends without error (`upload`), and deleted either way. It stands in for tmp file +
    rename, which object stores lack."""
    with tempfile.NamedTemporaryFile(prefix="saejax-", suffix=".upload") as f:
        yield f
        f.flush()
        upload(f.name, url)


def publish_dir(local: str | os.PathLike, url: str, last: str) -> None:
    """Make the prefix `url` hold exactly the files of the local directory `local`.

    There is no rename to swap a prefix in whole, so the order stands in for it: the old `last`
    object (a dataset's manifest, the file whose presence says "complete") is deleted first and
    the rest of the old prefix after it; the new files are uploaded, and `last` after all of
    them. A reader never sees a `last` beside files that are not its own; a crash part way
    leaves a prefix without `last`, visibly incomplete (the previous contents are gone)."""
    fs, root = _fs(url)
    old = fs.find(root)
    commit = f"{root}/{last}"
    if commit in old:
        fs.rm_file(commit)
    rest = [p for p in old if p != commit]
    if rest:
        fs.rm(rest)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    names = [p.relative_to(local).as_posix() for p in files]
    body = [(os.fspath(p), f"{root}/{n}") for p, n in zip(files, names) if n != last]
    if body:
        fs.put([a for a, _ in body], [b for _, b in body])
    if last in names:
        fs.put_file(os.path.join(local, last), commit)


def makedirs(path: str | os.PathLike) -> None:
    """Create a directory and its parents if missing; nothing for a URL (a prefix exists once
    an object is written under it, and creating a bucket is not this code's business)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def list_names(path: str | os.PathLike) -> list[str]:
    """Names directly in a directory or under a prefix ([] when there is none)."""
    try:
        return [p.name for p in as_path(path).iterdir()]
    except FileNotFoundError:
        return []


def size(path: str | os.PathLike) -> int:
    """Bytes in the file or object at `path`."""
    if not is_url(path):
        return os.path.getsize(path)
    fs, p = _fs(os.fspath(path))
    return int(fs.size(p))


def is_link(path: str | os.PathLike) -> bool:
    """Whether `path` is a symbolic link (objects never are)."""
    return not is_url(path) and os.path.islink(path)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a file, or a directory with everything in it (for a URL: every object under the
    prefix)."""
    if not is_url(path):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return
    fs, p = _fs(os.fspath(path))
    fs.rm(p, recursive=True)


def read_chunks(path: str | os.PathLike, chunk: int) -> Iterator[bytes]:
    """The bytes of the file or object at `path`, `chunk` at a time (one ranged read each on an
    object store: memory stays at one chunk whatever the object's size)."""
    if not is_url(path):
        with open(path, "rb") as f:
            while data := f.read(chunk):
                yield data
        return
    fs, p = _fs(os.fspath(path))
    with fs.open(p, "rb", block_size=chunk, cache_type="none") as f:
        while data := f.read(chunk):
            yield data


def glob_files(pattern: str) -> list[str]:
    """URLs of the objects matching a URL glob pattern (`*`, `?`, `[...]`, and `**` across
    "directories"), sorted; prefixes that only look like directories are left out."""
    fs, p = _fs(pattern)
    found = fs.glob(p, detail=True)
    return sorted(fs.unstrip_protocol(k) for k, info in found.items() if info.get("type") == "file")


def _read_ranges(urls: list[str], starts: list[int], ends: list[int]) -> list[Any]:
    """Bytes [start, end) of each object, read concurrently; a failed read (a missing object,
    a range past its end) gives its exception in place of the bytes."""
    out: list[Any] = [None] * len(urls)
    schemes: dict[str, list[int]] = {}
    for k, url in enumerate(urls):  # one round of requests per store (s3 and gs may mix)
        schemes.setdefault(url.split("://", 1)[0], []).append(k)
    for ks in schemes.values():
        fs, _ = _fs(urls[ks[0]])
        got = fs.cat_ranges([fs._strip_protocol(urls[k]) for k in ks], [starts[k] for k in ks],
                            [ends[k] for k in ks], on_error="return")
        for k, data in zip(ks, got):
            out[k] = data
    return out


# -- .npy arrays by byte ranges ---------------------------------------------------------------


class RangeNpy:
    """A .npy array in an object store, read by byte ranges instead of memory-mapped.

    Indexing matches what readers do with a memory-mapped shard: `a[i]` (one row), `a[idx]`
    (an integer array, any order, repeats allowed), `a[start:stop:step]`, `np.asarray(a)`
    (everything); results are ordinary arrays of the file's dtype, bitwise the bytes stored.
    Rows read together are fetched in one concurrent round (`take_rows`)."""

    def __init__(self, url: str, dtype: np.dtype, shape: tuple[int, ...], offset: int):
        self.url, self.dtype, self.shape, self.offset = url, dtype, shape, offset
        self.ndim = len(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.nbytes = shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"RangeNpy({self.url!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):  # a[i, j] would silently read rows i and j otherwise
            raise TypeError(f"{self.url}: index rows only (a[i], a[rows], a[start:stop])")
        if isinstance(index, slice):
            return take_rows([(self, np.arange(*index.indices(len(self))))])[0]
        if isinstance(index, (int, np.integer)):
            return take_rows([(self, np.array([index]))])[0][0]
        return take_rows([(self, index)])[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)

    def _plan(self, index) -> tuple[np.ndarray, tuple[int, ...], np.ndarray, np.ndarray]:
        """(each requested row's place among the rows fetched, the request's shape, first and
        end row of each range to fetch)."""
        idx = np.asarray(index)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"{self.url}: rows are indexed by integers, got {idx.dtype}")
        n = len(self)
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)].flat[0]
            raise IndexError(f"{self.url}: row {bad} is outside [0, {n})")
        rows, where = np.unique(idx.reshape(-1), return_inverse=True)
        if not rows.size:
            return where, idx.shape, rows, rows
        gaps = (np.diff(rows) - 1) * self.row_bytes  # bytes between neighbouring rows
        order = np.argsort(gaps, kind="stable")
        bridged = (np.cumsum(gaps[order]) <= SLACK * rows.size * self.row_bytes) \
            & (gaps[order] <= MAX_GAP)
        new = np.ones(gaps.size, bool)  # a gap not bridged opens a new range
        new[order[bridged]] = False
        head = np.flatnonzero(np.concatenate([[True], new]))  # each range's first row in rows
        first = rows[head]
        end = rows[np.concatenate([head[1:] - 1, [rows.size - 1]])] + 1
        run = np.cumsum(np.concatenate([[0], new]))  # the range of each distinct row
        before = np.concatenate([[0], np.cumsum(end - first)[:-1]])  # rows fetched before it
        return (rows - first[run] + before[run])[where], idx.shape, first, end

    def _assemble(self, plan, chunks: list[Any]) -> np.ndarray:
        """The requested rows from the bytes of the planned ranges."""
        at, shape, first, end = plan
        tail = self.shape[1:]
        for a, b, data in zip(first, end, chunks):
            if isinstance(data, BaseException) or len(data) != (b - a) * self.row_bytes:
                why = data if isinstance(data, BaseException) else f"{len(data)} bytes"
                raise ValueError(f"{self.url}: rows {a}..{b - 1} could not be read ({why}); "
                                 f"the object is truncated or was replaced")
        fetched = np.frombuffer(b"".join(chunks), self.dtype).reshape(-1, *tail)
        return fetched[at].reshape(*shape, *tail)

    def _ranges(self, plan) -> tuple[list[int], list[int]]:
        _, _, first, end = plan
        base = self.offset
        return ([base + int(a) * self.row_bytes for a in first],
                [base + int(b) * self.row_bytes for b in end])


def take_rows(requests: list[tuple[Any, Any]]) -> list[np.ndarray]:
    """`[array[index] for array, index in requests]`, with the byte ranges of every `RangeNpy`
    among them read in one concurrent round (a shuffled batch touches many shards); any other
    array (a memory map, an ndarray) is simply indexed."""
    out: list[Any] = [None] * len(requests)
    plans, urls, starts, ends = [], [], [], []
    for k, (array, index) in enumerate(requests):
        if not isinstance(array, RangeNpy):
            out[k] = array[index]
            continue
        plan = array._plan(index)
        a, b = array._ranges(plan)
        plans.append((k, array, plan, len(urls), len(a)))
        urls += [array.url] * len(a)
        starts += a
        ends += b
    chunks = _read_ranges(urls, starts, ends) if urls else []
    for k, array, plan, at, count in plans:
        out[k] = array._assemble(plan, chunks[at:at + count])
    return out


def _npy_header(head: bytes) -> tuple[np.dtype, tuple[int, ...], int] | int:
    """(dtype, shape, data offset) from the first bytes of a .npy file, or the number of bytes
    needed when `head` is shorter than the header. Raises ValueError when it is not one numpy
    can be read from without loading (bad magic, Fortran order, Python objects)."""
    fmt = np.lib.format
    f = io.BytesIO(head)
    major, minor = fmt.read_magic(f)
    width = 2 if (major, minor) == (1, 0) else 4
    if len(head) < f.tell() + width:
        return f.tell() + width
    offset = f.tell() + width + int.from_bytes(head[f.tell():f.tell() + width], "little")
    if len(head) < offset:
        return offset
    if (major, minor) == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif (major, minor) == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {major}.{minor} is not read by byte ranges")
    if dtype.hasobject:
        raise ValueError("it holds Python objects (pickled), not numbers")
    if fortran and len(shape) > 1:
        raise ValueError("it is stored in Fortran order; rows are read in C order")
    if not shape:
        raise ValueError("it holds a scalar, not rows")
    return dtype, tuple(int(s) for s in shape), offset


def open_npys(urls: list[str]) -> list[RangeNpy | Exception]:
    """Each object opened as a `RangeNpy`, or the reason it cannot be: FileNotFoundError when it
    is missing, ValueError when it is not a .npy array or is shorter than its header says (the
    check a memory map makes). Two concurrent rounds of reads whatever the number: the headers,
    then each array's last byte."""
    heads = _read_ranges(urls, [0] * len(urls), [_HEADER_PROBE] * len(urls))
    out: list[Any] = []
    for url, head in zip(urls, heads):
        out.append(_open_one(url, head))
    full = [k for k, a in enumerate(out) if isinstance(a, RangeNpy) and a.nbytes]
    last = [out[k].offset + out[k].nbytes for k in full]
    tails = _read_ranges([urls[k] for k in full], [e - 1 for e in last], last)
    for k, tail in zip(full, tails):
        if isinstance(tail, BaseException) or len(tail) != 1:
            out[k] = ValueError(f"it is shorter than the {out[k].offset + out[k].nbytes} bytes "
                                f"its header says (truncated)")
    return out


def _open_one(url: str, head: Any) -> RangeNpy | Exception:
    """`RangeNpy` of one object from its first bytes (read again in full if the header is
    longer), or the exception that says why not."""
    if isinstance(head, FileNotFoundError):
        return head
    if isinstance(head, BaseException):  # e.g. a range past the end of an empty object
        return ValueError(f"its first bytes cannot be read ({head})")
    try:
        parsed = _npy_header(head)
        if isinstance(parsed, int):
            head = _read_ranges([url], [0], [parsed])[0]
            if isinstance(head, BaseException):
                raise ValueError(f"its header cannot be read ({head})")
            parsed = _npy_header(head)
            if isinstance(parsed, int):
                raise ValueError("its header is truncated")
    except ValueError as e:
        return e
    except Exception as e:  # numpy's header parser raises several kinds
        return ValueError(str(e))
    return RangeNpy(url, *parsed)


# ---------------------------------------------------------------- whole trees of files
# (the s3:// staging of checkpoints in `saejax.checkpoint`)


def files_under(path: str | os.PathLike) -> dict[str, int]:
    """{relative path ('/'-separated): size in bytes} of every file under the directory or URL
    prefix `path`; {} when there is none."""
    text = os.fspath(path)
    if not is_url(text):
        root = Path(text)
        return {p.relative_to(root).as_posix(): p.stat().st_size
                for p in sorted(root.rglob("*")) if p.is_file()}
    fs, root = _fs(text)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {name[len(root.rstrip("/")) + 1:]: int(info["size"])
            for name, info in sorted(found.items()) if info.get("type") != "directory"}


def upload_files(local_dir: str | os.PathLike, url: str, names: list[str]) -> None:
    """Upload the files `names` (relative to `local_dir`) to the same relative paths under
    `url`, concurrently; each becomes one object, complete when its upload is."""
    if names:
        fs, root = _fs(url)
        fs.put([os.path.join(local_dir, n) for n in names], [f"{root}/{n}" for n in names])


def download_files(url: str, local_dir: str | os.PathLike, names: list[str]) -> None:
    """Download the objects `names` (relative to `url`) to the same relative paths under
    `local_dir`, concurrently (directories created as needed)."""
    if names:
        fs, root = _fs(url)
        local = [os.path.join(local_dir, n) for n in names]
        for path in local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.get([f"{root}/{n}" for n in names], local)
