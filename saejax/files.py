"""File-name helpers: the files a user's paths and globs name (every reader of activations and
text), distinct names for things written or shown side by side, and the paths a run records
(absolute when written, found again when the run and its data were moved together). URLs
(gs://, s3://) are accepted wherever a path is: globbed in their object store, never made
absolute or relocated."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable

from saejax.objstore import glob_files
from saejax.paths import absolute, as_path, is_url


def expand_paths(paths: str | os.PathLike | list[str | os.PathLike], what: str = "data") -> list[str]:
    """Files named by `paths`: each entry an existing file or a glob pattern (`**` recurses).

    Matches of each pattern are sorted, so the order (and with it the data) does not depend on
    directory listing order; a pattern matching nothing is an error rather than an empty input.
    An entry may be a URL, an object or a glob pattern over objects (`**` too).
    `what` names the kind of file in error messages."""
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise ValueError(f"paths is empty: name at least one {what} file or glob pattern")
    files: list[str] = []
    for entry in entries:
        entry = os.fspath(entry)
        if is_url(entry):
            files.extend(_url_files(entry, what))
            continue
        if os.path.isfile(entry):
            files.append(entry)
            continue
        if os.path.isdir(entry):
            raise _directory_error(entry)
        matches = sorted(m for m in glob.glob(entry, recursive=True) if os.path.isfile(m))
        if not matches:
            raise ValueError(f"{what} path or glob pattern {entry!r} matches no files")
        files.extend(matches)
    return files


def _url_files(entry: str, what: str) -> list[str]:
    """The objects a URL names: itself, or the sorted matches of a glob pattern."""
    path = as_path(entry)
    if path.is_file():
        return [entry]
    if path.is_dir():
        raise _directory_error(entry)
    matches = glob_files(entry)
    if not matches:
        raise ValueError(f"{what} path or glob pattern {entry!r} matches no files")
    return matches


def _directory_error(entry: str) -> ValueError:
    return ValueError(f"{entry!r} is a directory: name files with a glob such as "
                      f"{os.path.join(entry, '**', '*')!r}")


def unique_names(names: Iterable[str], sep: str = "-") -> list[str]:
    """`names` in order, a repeat suffixed {sep}2, {sep}3, ... (the first kept as is) so that
    no two are equal (a suffix another of the names already has is skipped)."""
    names = list(names)
    given, used, out = set(names), set(), []
    for name in names:
        new, k = name, 1
        while new in used or (k > 1 and new in given):
            k += 1
            new = f"{name}{sep}{k}"
        used.add(new)
        out.append(new)
    return out


def file_safe(name: str, default: str = "file") -> str:
    """`name` with every character but letters, digits, '_', '.' and '-' replaced by '_'."""
    return re.sub(r"[^\w.-]", "_", name) or default


def absolute_path(path: str) -> str:
    """`path` made absolute against the current directory ("" and URLs stay as they are): what a
    run records, so that it does not depend on the directory the command ran in."""
    return absolute(path)


def _exists(path: str) -> bool:
    """Whether `path` names something: an existing path, or a glob pattern matching a file."""
    return os.path.exists(path) or any(True for _ in glob.iglob(path, recursive=True))


def resolve_data_path(recorded: str, recorded_base: str, base: str | os.PathLike) -> str:
    """Where a path recorded beside `recorded_base` (a run or store directory, as recorded) is
    now that that directory is at `base`.

    `recorded` itself when it is absolute and exists (or is "", or a hub id). Otherwise the same
    relative location from `base`: a run directory moved together with its data (both under one
    parent) still finds it. This also resolves the relative paths of older runs, recorded
    against the directory the command ran in, as long as `recorded_base` is too. When neither
    exists `recorded` is returned unchanged, so the error names the path as recorded.

    A URL is never rewritten, and nothing is looked for relative to a run directory that is a
    URL (a bucket and a local tree do not move together)."""
    if not recorded or is_url(recorded) or is_url(recorded_base) or is_url(base):
        return recorded
    if os.path.isabs(recorded) and _exists(recorded):
        return recorded
    if recorded_base and os.path.isabs(recorded) == os.path.isabs(recorded_base):
        moved = os.path.normpath(os.path.join(os.path.abspath(base),
                                              os.path.relpath(recorded, recorded_base)))
        if _exists(moved):
            return moved
    return recorded
