"""Durable writes, the one home of them: files (tmp file + fsync + os.replace), whole
directories (written beside their destination, fsynced, renamed into place), JSON without NaN;
and sha256 checksums and manifests of the on-disk datasets.

A reader sees either the old file (or directory) or the complete new one, never a torn write.
The on-disk datasets (token shards in `saejax.text.tokens`, activation stores in
`saejax.data.store`) compute every shard's checksum from the bytes as they are written.

The writers and readers here also take URLs (gs://, s3://; `saejax.paths`). An object store
has no rename, so a file is written to a local temporary file and uploaded in one piece (an
object appears whole when its upload completes), and a directory is staged locally and uploaded
with its commit file (a dataset's manifest) last (`atomic_dir`). Shards there are read by byte
ranges instead of memory-mapped (`saejax.objstore.RangeNpy`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from saejax import objstore
from saejax.paths import as_path, is_url

_HASH_CHUNK = 1 << 20


class _HashingWriter:
    """A write-only file object that hashes everything written through it."""

    def __init__(self, f):
        self._f = f
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self._f.write(data)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: it is `path.tmp`, fsynced and renamed onto `path`
    when the block ends without error (readers see the old file or the new one, whole). For a
    URL it is a local temporary file, uploaded as the object in one piece."""
    if is_url(path):
        with objstore.staged_upload(os.fspath(path)) as f:
            yield f
        return
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (`open_atomic`)."""
    with open_atomic(path) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically and durably (`open_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_npy_atomic(path: str, array: np.ndarray) -> str:
    """Save `array` as an .npy file at `path` atomically (`open_atomic`); return the sha256 of
    the file's bytes (header included), computed while writing."""
    with open_atomic(path) as f:
        w = _HashingWriter(f)
        np.save(w, np.ascontiguousarray(array), allow_pickle=False)
    return w.digest.hexdigest()


def json_safe(obj: Any) -> Any:
    """`obj` with NaN and ±Inf floats as None (JSON has neither) and numpy scalars as Python
    numbers, through dicts, lists and tuples (tuples become lists)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON (trailing newline), atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a directory (which makes the names created or renamed in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Make the finished directory `tmp` (a sibling of `out`) the directory `out`, durably.

    The files directly in `tmp` and `tmp` itself are fsynced first (files in subdirectories are
    the writer's to fsync). An existing `out` is renamed aside, `tmp` renamed in, the old one
    deleted and the parent fsynced: a crash in between leaves `.<name>.old-*` holding the
    previous `out`, never a torn one."""
    tmp, out = Path(tmp), Path(out)
    for f in tmp.iterdir():
        if f.is_file():
            fsync_path(f)
    fsync_path(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    fsync_path(out.parent)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """An empty directory beside `out` to write into; when the block ends without error it
    replaces `out` (`replace_dir`), on error it is removed and `out` is left as it was.

    For a URL `out`, the directory is a local temporary one; when the block ends without error
    it is uploaded over the prefix `out` (`saejax.objstore.publish_dir`): the old `last` file
    (the one whose presence says "complete"; default `MANIFEST`) is deleted first, then the
    rest of the old prefix, and the new `last` is uploaded after every other file. Until the
    block ends `out` is left as it was; after that there is no moment at which `out` holds a
    `last` with files not its own, but a crash during the upload leaves it without `last`,
    visibly incomplete, where a local directory would still hold the old one."""
    if is_url(out):
        with tempfile.TemporaryDirectory(prefix="saejax-") as tmp:
            yield Path(tmp)
            objstore.publish_dir(tmp, os.fspath(out), last or MANIFEST)
        return
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's (or object's) bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for chunk in objstore.read_chunks(path, _HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


MANIFEST = "manifest.json"
"""Written last, atomically: a directory without it is not a complete dataset."""
MARKER = ".incomplete"
"""Present while a writer runs: tells an interrupted write from a directory of other files."""


def read_manifest_json(path: str, *, what: str, fmt: str, version: int,
                       fields: dict[str, type], rerun_hint: str) -> dict[str, Any]:
    """The manifest of the on-disk dataset at `path`, checked for format, version and the
    top-level `fields` (name -> type) readers rely on; errors name the file and the field."""
    file = os.path.join(path, MANIFEST)
    if not as_path(file).is_file():
        hint = (f" (it holds the {MARKER} marker: {rerun_hint})"
                if as_path(os.path.join(path, MARKER)).exists() else "")
        raise ValueError(f"{path} is not {what}: no {MANIFEST}{hint}")
    try:
        m = json.loads(as_path(file).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise ValueError(f"{file}: not a saejax {what} manifest (format != {fmt!r})")
    if m.get("version") != version:
        raise ValueError(f"{file}: version {m.get('version')!r}, this saejax reads {version}")
    for key, kind in fields.items():
        if not isinstance(m.get(key), kind):
            raise ValueError(f"{file}: field {key!r} missing or not a {kind.__name__}")
    return m


def open_shard(root: str, entry: dict[str, Any], dtype: np.dtype, width: int,
               what: str = "") -> np.ndarray:
    """Memory-map the manifest entry's .npy shard under `root`, checked to exist and to hold
    [entry["rows"], width] values of `dtype`; errors name the shard file. Under a URL root the
    shard is a `saejax.objstore.RangeNpy`, read by byte ranges."""
    return open_shards(root, [entry], dtype, width, what)[0]


def open_shards(root: str, entries: list[dict[str, Any]], dtype: np.dtype, width: int,
                what: str = "") -> list[np.ndarray]:
    """`open_shard` of every entry; under a URL root all headers are read in one concurrent
    round of requests rather than one shard after another. The first bad shard raises."""
    paths = [os.path.join(root, e["file"]) for e in entries]
    if is_url(root) and os.environ.get(CACHE_ENV):
        paths = cached_shards(root, entries)
    # Local shards are mapped lazily, each checked before the next is opened, as always.
    opened = objstore.open_npys(paths) if paths and is_url(paths[0]) else map(_memory_map, paths)
    return [_checked_shard(p, arr, e, dtype, width, what)
            for p, arr, e in zip(paths, opened, entries)]


CACHE_ENV = "SAEJAX_CACHE_DIR"
"""A local directory for the shards of datasets at a URL (set it on a long run: shuffled rows
read by byte ranges are bound by request latency; see bench/store_read.py --url)."""


def cached_shards(root: str, entries: list[dict[str, Any]]) -> list[str]:
    """Local copies of the shards of the URL dataset `root`, under $SAEJAX_CACHE_DIR (at
    <dir>/<scheme>/<bucket>/<key>/<file>), to memory-map instead of reading by byte ranges.

    Shards not yet there are downloaded whole (concurrently), checked against the manifest's
    sha256 and only then renamed into place, with the checked sha256 beside them
    (`<file>.sha256`); a copy whose recorded sha256 is the manifest's is used as it is. So a
    shard rewritten in the bucket (a new manifest) is fetched again, and a corrupt download is
    never used: its error names the URL."""
    base = Path(os.environ[CACHE_ENV]).absolute() / root.replace("://", "/", 1)
    local = [base / e["file"] for e in entries]
    missing = [e for e, p in zip(entries, local) if not _cached(p, e["sha256"])]
    if missing:
        part = base / f".download-{os.getpid()}"
        try:
            objstore.download_files(root, part, [e["file"] for e in missing])
        except FileNotFoundError:
            shutil.rmtree(part, ignore_errors=True)
            gone = [e["file"] for e in missing
                    if not as_path(os.path.join(root, e["file"])).exists()]
            raise _missing(os.path.join(root, (gone or ["?"])[0])) from None
        for e in missing:
            got = part / e["file"]
            digest = sha256_file(str(got))
            if digest != e["sha256"]:
                shutil.rmtree(part, ignore_errors=True)
                raise _mismatch(os.path.join(root, e["file"]), digest, e["sha256"],
                                "rewrite the dataset there")
            (base / e["file"]).parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, base / e["file"])
            write_text_atomic(f"{base / e['file']}.sha256", e["sha256"])
        shutil.rmtree(part, ignore_errors=True)
    return [str(p) for p in local]


def _cached(path: Path, sha256: str) -> bool:
    """Whether `path` is a checked copy of the shard whose manifest sha256 is `sha256`."""
    mark = Path(f"{path}.sha256")
    return path.is_file() and mark.is_file() and mark.read_text().strip() == sha256


def _memory_map(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise _missing(path)
    try:
        return np.load(path, mmap_mode="r")
    except Exception as e:  # truncated file, bad header, ...
        raise ValueError(f"{path}: cannot be memory-mapped as a .npy array, truncated or "
                         f"damaged? ({e})") from e


def _checked_shard(path: str, arr: Any, entry: dict[str, Any], dtype: np.dtype, width: int,
                   what: str) -> Any:
    """`arr` once it holds what the manifest says (an exception from opening it, raised as the
    one-line error naming the shard)."""
    if isinstance(arr, FileNotFoundError):
        raise _missing(path)
    if isinstance(arr, Exception):
        raise ValueError(f"{path}: cannot be read as a .npy array, truncated or damaged? "
                         f"({arr})") from arr
    if arr.dtype != dtype:
        raise ValueError(f"{path}: dtype {arr.dtype}, manifest says {what or dtype}")
    if arr.shape != (entry["rows"], width):
        raise ValueError(f"{path}: shape {arr.shape}, manifest says ({entry['rows']}, {width})")
    return arr


def verify_shards(root: str, entries: list[dict[str, Any]], redo: str) -> None:
    """Check each entry's file sha256 against the manifest; the error names the first bad shard
    and says how to redo it (`redo`)."""
    for entry in entries:
        path = os.path.join(root, entry["file"])
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise _mismatch(path, digest, entry["sha256"], redo)


def _missing(path: str) -> ValueError:
    return ValueError(f"{path}: shard listed in {MANIFEST} is missing")


def _mismatch(path: str, digest: str, want: str, redo: str) -> ValueError:
    return ValueError(f"{path}: checksum mismatch (sha256 {digest}, {MANIFEST} says {want}); the "
                      f"shard is corrupt or was modified: {redo}")
