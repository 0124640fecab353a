"""Where saejax reads and writes: local paths and object-store URLs (gs://, s3://) alike.

One path layer, `etils.epath` (the one Orbax uses; gs:// and s3:// go through fsspec's gcsfs and
s3fs). A local path stays a `pathlib.Path`, so fsync, rename and mmap work as before; a URL
becomes an `epath.Path`, which has the same pathlib API (`/`, `exists`, `is_file`, `iterdir`,
`glob`, `mkdir`, `open`, `read_text`, `write_bytes`, `unlink`, ...). What an object store lacks is
handled once, where it matters:

- no rename: an object is published whole when its write closes, so an atomic file write is one
  upload (`saejax.atomic.open_atomic`), and a dataset's manifest, written last, is its commit;
- no append: `append_text` rewrites the object (progress files are small; metrics.jsonl is
  buffered and rewritten, `saejax.train.runner.MetricsFile`);
- no mmap: the .npy shards of stores and token datasets are read by byte ranges
  (`saejax.objstore.RangeNpy`);
- Orbax cannot write arrays to s3:// at all: `saejax.checkpoint` stages those checkpoints.

Credentials and endpoints are the storage client's own: `GOOGLE_APPLICATION_CREDENTIALS` for
gs://, the AWS variables for s3:// (`AWS_ENDPOINT_URL` points it at any S3-compatible server).
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from etils import epath

URL_PREFIXES = ("gs://", "s3://")
"""Object-store schemes saejax reads and writes (through `etils.epath`)."""

AnyPath = Union[pathlib.Path, "epath.Path"]  # epath is imported when a URL is first used


def is_url(path: str | os.PathLike | None) -> bool:
    """Whether `path` names an object in an object store (gs://, s3://) rather than a file."""
    return path is not None and os.fspath(path).startswith(URL_PREFIXES)


def as_path(path: str | os.PathLike) -> AnyPath:
    """`path` as a path object: `pathlib.Path` for a local path, `epath.Path` for a URL.

    A URL needs its storage client installed (`pip install s3fs` or `gcsfs`); without it the
    error says which one."""
    if isinstance(path, pathlib.Path):
        return path
    text = os.fspath(path)
    if not is_url(text):
        return pathlib.Path(text)
    client = {"s3": "s3fs", "gs": "gcsfs"}[text.split(":", 1)[0]]
    try:
        __import__(client)
    except ImportError:
        from saejax.errors import ConfigError
        raise ConfigError(f"{text}: reading and writing {text.split(':', 1)[0]}:// paths needs "
                          f"the {client} package (pip install {client})") from None
    _no_listing_cache()
    from etils import epath
    return epath.Path(text)


def _no_listing_cache() -> None:
    """fsspec caches directory listings per client; another process (a peer, a resumed run)
    writes the same bucket, so a cached listing would be stale: list afresh every time."""
    import fsspec

    for protocol in ("s3", "gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` that keeps a URL's `scheme://` (a plain string comes back)."""
    return os.fspath(as_path(base).joinpath(*parts)) if is_url(base) else os.path.join(base, *parts)


def absolute(path: str) -> str:
    """`path` made absolute against the current directory ("" and URLs unchanged)."""
    return path if not path or is_url(path) else os.path.abspath(path)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to a file; an object is rewritten whole with `text` added (object stores
    cannot append)."""
    p = as_path(path)
    if not is_url(path):
        with p.open("a", encoding="utf-8") as fh:
            fh.write(text)
        return
    old = p.read_text(encoding="utf-8") if p.exists() else ""
    p.write_text(old + text, encoding="utf-8")

