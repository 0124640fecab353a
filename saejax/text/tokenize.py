"""`saejax tokenize` as one function: check everything, then (train a BPE and) pack, atomically.

    ds = tokenize(Corpus(["corpus/*.txt"], separator=""), "data/tokens", train_bpe=4096)

Every check that needs no tokenizing runs first (`check_tokenize`): the options agree, the
input files exist, the token dataset's directory and the tokenizer's are free (or `overwrite`),
a given tokenizer loads and has the BOS/EOS tokens the packing needs. Only then is a BPE
trained or a token written. Writes never damage what is there:

* a fresh or interrupted dataset directory is written in place (`saejax.text.tokens`' restart
  rules);
* with `overwrite`, a complete dataset (and a trained tokenizer's directory) is written beside
  the old one and swapped in only when the new one is complete (`saejax.atomic.atomic_dir`): an
  error or Ctrl-C on the way leaves the old dataset and its tokenizer whole.

The dataset and a trained tokenizer may go to URLs (gs://, s3://). A fresh dataset is written
straight into the bucket (shards as objects, manifest last); a replaced one, and a trained
tokenizer, are written to a local temporary directory and uploaded with the manifest (the
tokenizer: tokenizer.json) last (`atomic_dir`'s object-store form: the old one stays whole
until the new one is complete, then is deleted manifest first).
"""

from __future__ import annotations

import contextlib
import os

from saejax.atomic import MANIFEST, atomic_dir
from saejax.files import absolute_path
from saejax.objstore import list_names
from saejax.paths import as_path, is_url
from saejax.text.corpus import Corpus
from saejax.text.tokens import BosMode, Packer, TokenDataset, check_output_dir, special_ids, \
    write_token_dataset

BYTE_TOKENS = 256
"""A byte-level BPE holds the 256 byte tokens and its special token before any merge."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""A directory holding one of these is a tokenizer directory `--overwrite` may replace."""


def default_tokenizer_dir(out_dir: str | os.PathLike) -> str:
    """Where a trained BPE goes by default: OUT_DIR-tokenizer beside the dataset (a trailing
    slash on out_dir must not put it inside the dataset)."""
    out_dir = os.fspath(out_dir)
    if is_url(out_dir):  # normpath would fold the '//' of 's3://'
        return out_dir.rstrip("/") + "-tokenizer"
    return os.path.normpath(out_dir) + "-tokenizer"


def _nested(a: str, b: str) -> bool:
    """Whether one of the two paths is the other or lies inside it."""
    if is_url(a) or is_url(b):
        a, b = (p.rstrip("/") + "/" for p in (a, b))
        return a.startswith(b) or b.startswith(a)
    a, b = os.path.abspath(a), os.path.abspath(b)
    return os.path.commonpath([a, b]) in (a, b)


def _check_tokenizer_dir(path: str, overwrite: bool) -> None:
    """Refuse a non-empty directory for a trained BPE unless `overwrite` and it holds a tokenizer
    (a directory of other files is never replaced)."""
    if not as_path(path).exists():
        return
    if not as_path(path).is_dir():
        raise FileExistsError(f"tokenizer directory {path} is a file: choose another "
                              f"--tokenizer-out")
    names = list_names(path)
    if not names:
        return
    if not any(f in names and as_path(os.path.join(path, f)).is_file() for f in TOKENIZER_FILES):
        raise FileExistsError(f"{path} holds files that are not a tokenizer; refusing to write a "
                              f"tokenizer into it: choose another --tokenizer-out")
    if not overwrite:
        raise FileExistsError(f"{path} already holds a tokenizer; pass --overwrite to replace it "
                              f"(with the token dataset), or choose another --tokenizer-out")


def check_tokenize(corpus: Corpus, out_dir: str | os.PathLike, *, tokenizer: str | None,
                   train_bpe: int | None, tokenizer_out: str | None, ctx_len: int,
                   bos: BosMode, max_contexts: int | None, overwrite: bool):
    """Every check `tokenize` can make before tokenizing anything; returns the given tokenizer
    loaded (None with train_bpe). Errors are ValueError/FileExistsError naming the option."""
    from saejax.text.tokenizer import load_tokenizer  # noqa: PLC0415 (imports transformers)

    if (tokenizer is None) == (train_bpe is None):
        raise ValueError("give exactly one of --tokenizer DIR_OR_ID and --train-bpe VOCAB_SIZE")
    if tokenizer_out is not None and train_bpe is None:
        raise ValueError("--tokenizer-out is where --train-bpe saves its tokenizer; without "
                         "--train-bpe there is nothing to save")
    if train_bpe is not None and train_bpe <= BYTE_TOKENS:
        raise ValueError(f"--train-bpe {train_bpe}: a byte-level BPE needs more than "
                         f"{BYTE_TOKENS} tokens (the bytes plus <|endoftext|>)")
    Packer(ctx_len, bos, bos_id=0)  # checks the bos mode and ctx_len without a tokenizer
    if max_contexts is not None and max_contexts < 1:
        raise ValueError(f"--max-contexts must be >= 1, got {max_contexts}")
    corpus.files()  # every file or pattern names an existing file
    check_output_dir(out_dir, overwrite)
    if train_bpe is not None:
        tok_dir = tokenizer_out or default_tokenizer_dir(out_dir)
        if _nested(tok_dir, os.fspath(out_dir)):
            raise ValueError(f"the tokenizer directory {tok_dir} and the token dataset "
                             f"{os.fspath(out_dir)} must not contain each other")
        _check_tokenizer_dir(tok_dir, overwrite)
        return None
    tok = load_tokenizer(tokenizer)
    special_ids(tok, bos, "eos")  # the BOS/EOS tokens the packing mode needs
    return tok


def tokenize(corpus: Corpus, out_dir: str | os.PathLike, *, tokenizer: str | None = None,
             train_bpe: int | None = None, tokenizer_out: str | None = None,
             ctx_len: int = 128, bos: BosMode = "every_context",
             max_contexts: int | None = None, overwrite: bool = False,
             progress: bool = False) -> tuple[TokenDataset, str | None]:
    """Pack `corpus` into a token dataset at out_dir with the tokenizer `tokenizer` (HF directory
    or hub id), or a byte-level BPE of `train_bpe` tokens trained on it and saved to
    `tokenizer_out` (default OUT_DIR-tokenizer). Returns (the dataset, the trained tokenizer's
    directory or None). Checks and write rules: the module docstring."""
    from saejax.text.tokenizer import train_bpe as fit_bpe  # noqa: PLC0415

    tok = check_tokenize(corpus, out_dir, tokenizer=tokenizer, train_bpe=train_bpe,
                         tokenizer_out=tokenizer_out, ctx_len=ctx_len, bos=bos,
                         max_contexts=max_contexts, overwrite=overwrite)
    out_dir = os.fspath(out_dir)
    tok_dir = None if train_bpe is None else (tokenizer_out or default_tokenizer_dir(out_dir))
    # Recorded in the manifest: absolute for a local directory, so the dataset's readers (the LM
    # trainer copies the tokenizer) find it from any directory.
    local = tok_dir or (tokenizer if os.path.isdir(tokenizer) else None)
    tok_path = absolute_path(local) if local else tokenizer
    replace = as_path(os.path.join(out_dir, MANIFEST)).is_file()  # complete: overwrite it whole
    with contextlib.ExitStack() as stack:
        # Entered first, left last: the tokenizer is swapped in right after the dataset.
        if tok_dir is not None:
            tok_tmp = stack.enter_context(atomic_dir(tok_dir, last=TOKENIZER_FILES[0]))
            tok = fit_bpe(corpus, train_bpe, tok_tmp)
        target = stack.enter_context(atomic_dir(out_dir)) if replace else out_dir
        write_token_dataset(corpus, tok, target, ctx_len=ctx_len, bos=bos,
                            max_contexts=max_contexts, source=corpus.describe(),
                            tokenizer_path=tok_path, progress=progress)
    return TokenDataset(out_dir), tok_dir
