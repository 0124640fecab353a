"""Documents (strings) from text files, JSON-lines files (local, or objects at gs:// and s3://
URLs), or HF `datasets`.

A corpus is a re-iterable, deterministic sequence of documents: iterating it twice gives the
same documents in the same order (files are read in the order given, each glob's matches
sorted), which is what makes a token dataset a pure function of (corpus, tokenizer, packing).

Plain-text files are one document each, or are split into documents on *separator lines*: a
line whose content (trailing whitespace removed) equals `separator` exactly. `separator=""`
splits on blank lines (paragraphs), `separator="%"` reads fortune files. Leading and trailing
blank lines of each document are dropped, and documents left empty are skipped, so runs of
separators never produce empty documents.

JSON-lines files hold one JSON object per line with the document under `field` (default
"text"). Blank lines are skipped; any other line that is not a JSON object with a string
`field` is an error naming the file and line number, because silently skipping it would
change the corpus without anyone noticing.

HF datasets are read through `datasets.load_dataset(name, config, split=..., streaming=True)`.
`datasets` is imported only when such a corpus is iterated, so it stays an optional dependency.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from saejax.files import expand_paths
from saejax.paths import as_path

# CSI escape sequences (colours, cursor moves) as found in some fortune files (fortunes-zh).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def expand_text_paths(paths: str | os.PathLike | list[str | os.PathLike]) -> list[str]:
    """Text files named by `paths` (files or glob patterns, see `saejax.files.expand_paths`)."""
    return expand_paths(paths, "text")


def read_text_file(path: str, encoding: str = "utf-8") -> str:
    """The whole file as a string, with a decoding error naming the file and byte offset
    (e.g. a binary `.dat` index picked up by a `fortunes/*` glob)."""
    data = as_path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid {encoding} text at byte {e.start} ({e.reason}); "
                         f"is it a binary file matched by a glob?") from None


def split_documents(text: str, separator: str | None) -> Iterator[str]:
    """Documents of one file's text (see module docstring for the separator-line rule).

    Lines are split on "\n" only (not on form feeds or Unicode line separators, which are
    content), and a trailing "\r" counts as trailing whitespace, so CRLF files split alike."""
    if separator is None:
        doc = _strip_blank_lines(text.split("\n"))
        if doc:
            yield doc
        return
    lines: list[str] = []
    for line in text.split("\n"):
        if line.rstrip() == separator:
            doc = _strip_blank_lines(lines)
            if doc:
                yield doc
            lines = []
        else:
            lines.append(line)
    doc = _strip_blank_lines(lines)
    if doc:
        yield doc


def _strip_blank_lines(lines: list[str]) -> str:
    """The lines joined, without leading blank lines and trailing whitespace (indentation of
    the first non-blank line is kept: it can matter, e.g. for code or verse)."""
    start = 0
    while start < len(lines) and not lines[start].strip():
        start += 1
    return "\n".join(lines[start:]).rstrip()


def iter_text_files(files: list[str], separator: str | None = None, encoding: str = "utf-8",
                    strip_ansi: bool = False) -> Iterator[str]:
    """Documents of plain-text files, in file order."""
    for path in files:
        text = read_text_file(path, encoding)
        if strip_ansi:
            text = _ANSI.sub("", text)
        yield from split_documents(text, separator)


def iter_jsonl_files(files: list[str], text_field: str = "text",
                     encoding: str = "utf-8") -> Iterator[str]:
    """The `text_field` string of every record of JSON-lines files, in file and line order."""
    for path in files:
        with io.TextIOWrapper(as_path(path).open("rb"), encoding=encoding, newline="\n") as f:
            lineno = 0
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno + 1}: not valid {encoding} text "
                                     f"({e.reason})") from None
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue
                yield _jsonl_text(path, lineno, line, text_field)


def _jsonl_text(path: str, lineno: int, line: str, text_field: str) -> str:
    """The document of one JSON-lines record, or an error naming file:line and what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") \
            from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} "
                         f"field, got {type(record).__name__}")
    return record_text(record, text_field, f"{path}:{lineno}:")


def record_text(record: dict, text_field: str, where: str) -> str:
    """record[text_field] as a string, or an error starting with `where` saying what is wrong."""
    if text_field not in record:
        raise ValueError(f"{where} record has no {text_field!r} field (fields: "
                         f"{sorted(record)[:10]})")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where} field {text_field!r} is a {type(text).__name__}, "
                         "expected a string")
    return text


def iter_hf_dataset(name: str, config: str | None = None, split: str = "train",
                    text_field: str = "text", streaming: bool = True,
                    **load_kwargs: Any) -> Iterator[str]:
    """The `text_field` of every row of an HF dataset (streamed by default: no full download).

    `datasets` is imported here, not at module import, so saejax runs without it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"reading the HF dataset {name!r} needs the optional `datasets` package "
            f"(pip install datasets); local text and JSON-lines files work without it") from e
    ds = datasets.load_dataset(name, config, split=split, streaming=streaming, **load_kwargs)
    where = f"HF dataset {name!r}" + (f" ({config})" if config else "") + f" split {split!r}"
    for i, row in enumerate(ds):
        yield record_text(row, text_field, f"{where}, row {i}:")


@dataclass
class Corpus:
    """A re-iterable document source: local files (`paths`) or an HF dataset (`hf_name`).

    Iterating yields document strings; `describe()` is the JSON-able record of where they came
    from (written into the token dataset's manifest)."""

    paths: list[str] = field(default_factory=list)
    """Text or JSON-lines files and glob patterns (matches sorted; order of entries kept)."""
    format: Literal["auto", "text", "jsonl"] = "auto"
    """`auto`: .jsonl/.ndjson files are JSON lines, everything else plain text."""
    separator: str | None = None
    """Plain text: None = one document per file; else the separator-line content
    ("" = blank lines, "%" = fortune files)."""
    text_field: str = "text"
    """JSON lines and HF datasets: the field holding the document."""
    strip_ansi: bool = False
    """Plain text: remove ANSI escape sequences (some fortune files carry colour codes)."""
    encoding: str = "utf-8"
    hf_name: str | None = None
    """HF dataset name or local loading script/dir; when set, `paths` must be empty."""
    hf_config: str | None = None
    """HF dataset configuration name (the second argument of `load_dataset`)."""
    split: str = "train"
    max_documents: int | None = None
    """Stop after this many documents (None = all)."""

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [os.fspath(self.paths)]
        if self.hf_name is not None and self.paths:
            raise ValueError("a corpus reads either files (paths) or an HF dataset (hf_name), "
                             "not both")
        if self.hf_name is None and not self.paths:
            raise ValueError("a corpus needs paths (text/JSON-lines files or globs) or hf_name")
        if self.format not in ("auto", "text", "jsonl"):
            raise ValueError(f"format must be 'auto', 'text' or 'jsonl', got {self.format!r}")
        if self.max_documents is not None and self.max_documents < 0:
            raise ValueError(f"max_documents must be >= 0, got {self.max_documents}")

    def files(self) -> list[str]:
        """The files read, in order (empty for an HF dataset)."""
        return expand_text_paths(self.paths) if self.paths else []

    def __iter__(self) -> Iterator[str]:
        docs = self._documents()
        if self.max_documents is None:
            return docs
        return (doc for _, doc in zip(range(self.max_documents), docs))

    def _documents(self) -> Iterator[str]:
        if self.hf_name is not None:
            yield from iter_hf_dataset(self.hf_name, self.hf_config, self.split,
                                       self.text_field)
            return
        for path in self.files():
            if self._is_jsonl(path):
                yield from iter_jsonl_files([path], self.text_field, self.encoding)
            else:
                yield from iter_text_files([path], self.separator, self.encoding,
                                           self.strip_ansi)

    def _is_jsonl(self, path: str) -> bool:
        if self.format != "auto":
            return self.format == "jsonl"
        return path.lower().endswith(_JSONL_SUFFIXES)

    def describe(self) -> dict[str, Any]:
        """Where the documents come from, for the manifest (patterns, not every file name: a
        documentation tree has hundreds of files; the count says how many matched)."""
        if self.hf_name is not None:
            out: dict[str, Any] = {"hf_name": self.hf_name, "hf_config": self.hf_config,
                                   "split": self.split, "text_field": self.text_field}
        else:
            out = {"paths": list(self.paths), "n_files": len(self.files()),
                   "format": self.format, "separator": self.separator,
                   "text_field": self.text_field, "strip_ansi": self.strip_ansi}
        if self.max_documents is not None:
            out["max_documents"] = self.max_documents
        return out
