"""Token datasets: documents tokenized and packed into fixed-length contexts, stored as .npy shards.

Packing. Documents are tokenized in batches and laid end to end into one running token stream,
which is cut into contexts of `ctx_len` tokens. Where BOS goes is the `bos` mode:

    every_context  stream = d0 SEP d1 SEP d2 ...      context = [BOS] + next ctx_len-1 tokens
    document       stream = BOS d0 BOS d1 BOS d2 ...  context = next ctx_len stream tokens
    none           stream = d0 SEP d1 SEP d2 ...      context = next ctx_len stream tokens

SEP (`separator`, default the tokenizer's EOS; "none" = documents simply concatenated) sits
*between* consecutive documents; in `document` mode the BOS that starts each document is the
only marker. `every_context` with separator="bos" is SAELens' pretokenizer default (and the
same stream as separator="eos" for GPT-2-style tokenizers, where both are `<|endoftext|>`):
every context starts the way the LM's training sequences did, even mid-document. A context may then begin BOS SEP when the cut
falls just before a separator; that is kept, so the stream rule has no exceptions. Documents
that tokenize to nothing are skipped (they add no separator either). Every token of every
document appears exactly once, in order.

The last, partial context is dropped, never padded: a pad token would be a position the LM
runs on and the SAE trains on. The manifest records how many stream tokens were dropped.

On disk. `out_dir/tokens_00000.npy, ...` hold [rows, ctx_len] arrays (uint16 when the vocabulary
fits in 16 bits, else uint32), `contexts_per_shard` rows each except the last. `manifest.json`
lists them with row counts and sha256 checksums, and records ctx_len, dtype, the tokenizer,
the bos mode and the source. It is written last, atomically (tmp file + os.replace): a
directory without a manifest is not a dataset, whatever shards it holds.

Interrupted writes restart, they do not resume. The writer marks a directory it is filling
with an `.incomplete` file. Run again on a directory that has the marker and no manifest, it
deletes its own leftovers (tokens_*.npy, *.tmp) and starts over; the corpus and tokenizer are
deterministic, so the result is the same as an uninterrupted run. (Resuming would need the
packer's carry-over tokens and the document position saved per shard; tokenizing is cheap
next to the LM forward passes that consume the tokens, so the simpler contract wins.) A
directory with a manifest is complete: the writer refuses it unless `overwrite=True`, which
removes the manifest *first*, so a crash mid-overwrite leaves a directory that is visibly
not a dataset (`saejax.text.tokenize`, the command, instead writes the new dataset beside the
old one and swaps it in whole). A non-empty directory the writer did not create is never
touched.

`out_dir` may be a URL (gs://, s3://): each shard is uploaded as one object, the manifest last,
and the `.incomplete` marker is an object too; the dataset is then read by byte ranges instead of
memory maps (`saejax.objstore.RangeNpy`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np

from saejax.atomic import (MANIFEST, MARKER, open_shards, read_manifest_json,
                           verify_shards, write_json_atomic, write_npy_atomic)
from saejax.objstore import makedirs, take_rows
from saejax.paths import as_path
from saejax.text.tokenizer import encode_batch, tokenizer_name

BosMode = Literal["every_context", "document", "none"]
Separator = Literal["eos", "bos", "none"]
BOS_MODES = ("every_context", "document", "none")

FORMAT = "saejax.tokens"
VERSION = 1
_SHARD = re.compile(r"tokens_\d{5,}\.npy(\.tmp)?\Z")


# -- packing ------------------------------------------------------------------------------------


class Packer:
    """Cuts a stream of documents' token ids into [k, ctx_len] contexts (see module docstring).

    Feed documents with `add`, which returns the contexts completed so far (possibly none);
    `tail` is the number of stream tokens waiting for the next context, i.e. what is dropped if
    no document follows."""

    def __init__(self, ctx_len: int, bos: BosMode, bos_id: int | None = None,
                 sep_id: int | None = None):
        if bos not in BOS_MODES:
            raise ValueError(f"bos must be one of {BOS_MODES}, got {bos!r}")
        if bos != "none" and bos_id is None:
            raise ValueError(f"bos={bos!r} needs a BOS token id, got None")
        min_len = 2 if bos == "every_context" else 1
        if ctx_len < min_len:
            raise ValueError(f"ctx_len must be >= {min_len} for bos={bos!r}, got {ctx_len}")
        self.ctx_len, self.bos, self.bos_id = ctx_len, bos, bos_id
        self.sep_id = None if bos == "document" else sep_id
        self._body = ctx_len - 1 if bos == "every_context" else ctx_len
        self._carry = np.empty(0, np.int64)
        self._started = False
        self.n_documents = 0
        """Documents fed so far (including ones that tokenized to nothing)."""

    @property
    def tail(self) -> int:
        return len(self._carry)

    def add(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Append one document's tokens; return the contexts it completes, int64 [k, ctx_len]."""
        self.n_documents += 1
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        if len(tokens) == 0:
            return np.empty((0, self.ctx_len), np.int64)
        if self.bos == "document":
            lead = [self.bos_id]
        elif self._started and self.sep_id is not None:
            lead = [self.sep_id]
        else:
            lead = []
        self._started = True
        stream = np.concatenate([self._carry, np.asarray(lead, np.int64), tokens])
        k = len(stream) // self._body
        body, self._carry = stream[:k * self._body], stream[k * self._body:]
        body = body.reshape(k, self._body)
        if self.bos == "every_context":
            body = np.concatenate([np.full((k, 1), self.bos_id, np.int64), body], axis=1)
        return body


def pack_contexts(docs_tokens: Iterable[Sequence[int]], ctx_len: int, bos: BosMode,
                  bos_id: int | None = None, sep_id: int | None = None) -> np.ndarray:
    """All complete contexts of a sequence of documents' token ids, int64 [N, ctx_len]
    (the in-memory form of what `write_token_dataset` writes; the partial tail is dropped)."""
    packer = Packer(ctx_len, bos, bos_id, sep_id)
    blocks = [packer.add(t) for t in docs_tokens]
    return np.concatenate(blocks) if blocks else np.empty((0, ctx_len), np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0 .. vocab_size-1 (uint16 up to 65,536 tokens)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def special_ids(tokenizer, bos: BosMode, separator: Separator) -> tuple[int | None, int | None]:
    """(bos_id, sep_id) of a tokenizer for a packing mode; a tokenizer without BOS falls back
    to its EOS (GPT-2/Pythia style `<|endoftext|>` serves as both), and vice versa."""
    if separator not in ("eos", "bos", "none"):
        raise ValueError(f"separator must be 'eos', 'bos' or 'none', got {separator!r}")
    bos_tok, eos_tok = tokenizer.bos_token_id, tokenizer.eos_token_id
    bos_id = bos_tok if bos_tok is not None else eos_tok
    sep_id = {"eos": eos_tok if eos_tok is not None else bos_tok,
              "bos": bos_id, "none": None}[separator]
    name = tokenizer_name(tokenizer) or type(tokenizer).__name__
    if bos != "none" and bos_id is None:
        raise ValueError(f"bos={bos!r} needs a BOS (or EOS) token, but tokenizer {name!r} has "
                         f"neither; use bos='none'")
    if bos != "document" and separator != "none" and sep_id is None:
        raise ValueError(f"separator={separator!r}, but tokenizer {name!r} has no BOS or EOS "
                         f"token; use separator='none'")
    return (bos_id if bos != "none" else None), (sep_id if bos != "document" else None)


# -- writing ------------------------------------------------------------------------------------


def write_token_dataset(docs: Iterable[str], tokenizer, out_dir: str | os.PathLike,
                        ctx_len: int, *, bos: BosMode = "every_context",
                        separator: Separator = "eos", contexts_per_shard: int = 8192,
                        batch_documents: int = 256, max_contexts: int | None = None,
                        overwrite: bool = False, source: Any = None,
                        tokenizer_path: str | None = None,
                        progress: bool = False) -> "TokenDataset":
    """Tokenize `docs`, pack them into [N, ctx_len] contexts and write a token dataset to
    `out_dir` (layout, packing and restart rules in the module docstring); return it opened.

    `source` describes the documents for the manifest (default: `docs.describe()` when docs is
    a `Corpus`). `max_contexts` stops after that many contexts (a fixed-size subset).
    `tokenizer_path` is the tokenizer's location recorded in the manifest (default: the one it
    was loaded from; give it when the tokenizer directory is about to be moved into place)."""
    if contexts_per_shard < 1:
        raise ValueError(f"contexts_per_shard must be >= 1, got {contexts_per_shard}")
    if batch_documents < 1:
        raise ValueError(f"batch_documents must be >= 1, got {batch_documents}")
    if max_contexts is not None and max_contexts < 1:
        raise ValueError(f"max_contexts must be >= 1 (or None), got {max_contexts}")
    bos_id, sep_id = special_ids(tokenizer, bos, separator)
    packer = Packer(ctx_len, bos, bos_id, sep_id)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    if source is None and hasattr(docs, "describe"):
        source = docs.describe()

    out_dir = os.fspath(out_dir)
    prepare_output_dir(out_dir, overwrite)
    shards: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    n_pending = n_written = 0
    stopped = False
    bar = _progress_bar(progress, max_contexts)

    def flush(final: bool) -> None:
        nonlocal pending, n_pending, n_written
        block = np.concatenate(pending) if pending else np.empty((0, ctx_len), np.int64)
        while len(block) >= contexts_per_shard or (final and len(block)):
            rows, block = block[:contexts_per_shard], block[contexts_per_shard:]
            shards.append(_write_shard(out_dir, len(shards), rows, dtype, vocab_size))
            n_written += len(rows)
        pending, n_pending = ([block] if len(block) else []), len(block)

    for batch in _batches(docs, batch_documents):
        for ids in encode_batch(tokenizer, batch):
            contexts = packer.add(ids)
            if max_contexts is not None:
                contexts = contexts[:max_contexts - n_written - n_pending]
            if len(contexts):
                pending.append(contexts)
                n_pending += len(contexts)
                if bar is not None:
                    bar.update(len(contexts))
            if max_contexts is not None and n_written + n_pending >= max_contexts:
                stopped = True
                break
        if n_pending >= contexts_per_shard:
            flush(final=False)
        if stopped:
            break
    flush(final=True)
    if bar is not None:
        bar.close()
    if n_written == 0:
        raise ValueError(f"the documents give {packer.tail} tokens, fewer than one context of "
                         f"ctx_len={ctx_len}; nothing written to {out_dir}")

    manifest = {
        "format": FORMAT, "version": VERSION,
        "ctx_len": ctx_len, "dtype": dtype.name, "n_contexts": n_written,
        "n_tokens": n_written * ctx_len, "contexts_per_shard": contexts_per_shard,
        "bos": bos, "separator": separator if bos != "document" else None,
        "bos_id": bos_id, "sep_id": sep_id,
        "tokenizer": {"name_or_path": tokenizer_path or tokenizer_name(tokenizer),
                      "vocab_size": vocab_size,
                      "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token},
        "source": source,
        "n_documents": packer.n_documents,
        "stopped_at_max_contexts": stopped,
        "dropped_tail_tokens": None if stopped else packer.tail,
        "shards": shards,
    }
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    as_path(os.path.join(out_dir, MARKER)).unlink()
    return TokenDataset(out_dir)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> set[str]:
    """Refuse `out_dir` as a place to write a token dataset, touching nothing: a complete dataset
    without `overwrite`, a file, foreign files, shards nobody marked. Returns the names it
    holds (empty when it does not exist)."""
    out_dir = os.fspath(out_dir)
    path = as_path(out_dir)
    if not path.exists():
        return set()
    if not path.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a directory: choose another out_dir")
    names = {p.name for p in path.iterdir()}
    if MANIFEST in names and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a complete token dataset ({MANIFEST}); "
                              f"pass --overwrite to replace it, or choose another directory")
    foreign = sorted(names - _ours(names))
    if foreign:
        raise FileExistsError(f"{out_dir} holds files a token dataset does not ({foreign[:5]}); "
                              f"refusing to write into it: choose an empty or new directory")
    if names and MARKER not in names and MANIFEST not in names:
        raise FileExistsError(f"{out_dir} holds token shards but neither {MANIFEST} nor the "
                              f"{MARKER} marker of an interrupted write; remove them by hand")
    return names


def _ours(names: set[str]) -> set[str]:
    """The names of a directory listing that a token-dataset writer makes."""
    return {n for n in names if _SHARD.match(n)} | ({MANIFEST, MANIFEST + ".tmp", MARKER} & names)


def prepare_output_dir(out_dir: str, overwrite: bool) -> None:
    """Make `out_dir` an empty-of-shards directory marked incomplete (restart rules in the
    module docstring); refuse what `check_output_dir` refuses."""
    names = check_output_dir(out_dir, overwrite)
    makedirs(out_dir)
    ours = _ours(names)
    _touch(os.path.join(out_dir, MARKER))  # before anything is deleted or written
    if MANIFEST in names:
        # first: from here on the directory is visibly incomplete
        as_path(os.path.join(out_dir, MANIFEST)).unlink()
    for name in sorted(ours - {MARKER, MANIFEST}):
        as_path(os.path.join(out_dir, name)).unlink()


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_shard(out_dir: str, index: int, rows: np.ndarray, dtype: np.dtype,
                 vocab_size: int) -> dict[str, Any]:
    """Write one shard (tmp + rename) and return its manifest entry."""
    name = f"tokens_{index:05d}.npy"
    if len(rows) and (rows.min() < 0 or rows.max() >= np.iinfo(dtype).max + 1):
        raise ValueError(f"{name}: token id {int(rows.max())} does not fit {dtype.name} "
                         f"(tokenizer vocab_size={vocab_size}); the tokenizer reports a wrong "
                         f"vocabulary size")
    sha256 = write_npy_atomic(os.path.join(out_dir, name), rows.astype(dtype, copy=False))
    return {"file": name, "rows": int(len(rows)), "sha256": sha256}


def _touch(path: str) -> None:
    as_path(path).write_text("a saejax token dataset is being written here; no manifest.json "
                             "= not complete\n", encoding="utf-8")


def _progress_bar(enabled: bool, total: int | None):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit=" contexts", desc="packing")


# -- reading ------------------------------------------------------------------------------------


class TokenDataset:
    """A token dataset written by `write_token_dataset`, shards memory-mapped.

    Opening checks the manifest against the files (every shard present, [rows, ctx_len],
    manifest dtype, rows summing to n_contexts); `verify()` also checks the sha256 of every
    shard (it reads all the bytes, so it is not done on open). Contexts are served as int32,
    the dtype JAX embeddings index with."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.ctx_len: int = m["ctx_len"]
        self.n_contexts: int = m["n_contexts"]
        self.dtype = np.dtype(m["dtype"])
        self.bos: str = m["bos"]
        self.bos_id: int | None = m["bos_id"]
        self.vocab_size: int = m["tokenizer"]["vocab_size"]
        self._shards = open_shards(self.path, m["shards"], self.dtype, self.ctx_len)
        lengths = np.array([len(s) for s in self._shards], np.int64)
        if int(lengths.sum()) != self.n_contexts:
            raise ValueError(f"{self.path}/{MANIFEST}: n_contexts={self.n_contexts} but the "
                             f"shards hold {int(lengths.sum())} rows")
        self._ends = np.cumsum(lengths)
        self._starts = self._ends - lengths

    def __repr__(self) -> str:
        return (f"TokenDataset({self.path!r}, n_contexts={self.n_contexts}, "
                f"ctx_len={self.ctx_len}, bos={self.bos!r}, {len(self._shards)} shards)")

    def __len__(self) -> int:
        return self.n_contexts

    def __getitem__(self, index: int) -> np.ndarray:
        """Context `index` (0 <= index < len), int32 [ctx_len]."""
        index = int(index)
        if not 0 <= index < self.n_contexts:
            raise IndexError(f"context {index} is outside [0, {self.n_contexts})")
        s = int(np.searchsorted(self._ends, index, side="right"))
        return np.asarray(self._shards[s][index - self._starts[s]], np.int32)

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Contexts `indices`, in the order given, int32 [len(indices), ctx_len]."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_contexts):
            bad = int(idx[(idx < 0) | (idx >= self.n_contexts)][0])
            raise IndexError(f"context {bad} is outside [0, {self.n_contexts})")
        out = np.empty((len(idx), self.ctx_len), np.int32)
        shard = np.searchsorted(self._ends, idx, side="right")
        used = np.unique(shard)
        wheres = [np.flatnonzero(shard == s) for s in used]
        # every shard's rows in one call: one round of requests on an object store
        blocks = take_rows([(self._shards[s], idx[w] - self._starts[s])
                            for s, w in zip(used, wheres)])
        for where, block in zip(wheres, blocks):
            out[where] = block
        return out

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (error names the first bad shard)."""
        verify_shards(self.path, self.manifest["shards"], "re-run the packer")


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the token dataset at `path`, checked for the fields readers rely on."""
    file = os.path.join(path, MANIFEST)
    m = read_manifest_json(
        path, what="a token dataset", fmt=FORMAT, version=VERSION,
        fields={"ctx_len": int, "n_contexts": int, "dtype": str, "bos": str, "tokenizer": dict,
                "shards": list},
        rerun_hint="a write was interrupted; re-run the packer")
    if m["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{file}: dtype {m['dtype']!r} is not uint16 or uint32")
    for i, s in enumerate(m["shards"]):
        if not (isinstance(s, dict) and isinstance(s.get("file"), str)
                and isinstance(s.get("rows"), int) and isinstance(s.get("sha256"), str)):
            raise ValueError(f"{file}: shards[{i}] needs file, rows and sha256")
        if os.path.basename(s["file"]) != s["file"]:
            raise ValueError(f"{file}: shards[{i}] file {s['file']!r} must be a bare file name")
    return m
