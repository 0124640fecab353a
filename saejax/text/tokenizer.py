"""Tokenizers: any HF tokenizer through `AutoTokenizer`, and a byte-level BPE trained locally.

`train_bpe` builds the GPT-2 style tokenizer the paper's small model needs when no hub is
reachable: byte-level pre-tokenization (every string, in any script, maps to tokens and decodes
back to exactly the same string), BPE merges learned from the corpus, and one special token,
`<|endoftext|>`, used as both BOS and EOS. It is saved as an ordinary HF tokenizer directory,
so the rest of saejax (and any other tool) loads it with `AutoTokenizer.from_pretrained`.

No post-processor is installed: encoding never adds BOS/EOS by itself. Where they go is the
packer's decision (`saejax.text.tokens`), made once and recorded in the dataset's manifest.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

from saejax.atomic import write_json_atomic

ENDOFTEXT = "<|endoftext|>"


def load_tokenizer(path_or_id: str | os.PathLike, **kwargs: Any):
    """An HF tokenizer from a local directory (e.g. one written by `train_bpe`, or a model
    checkpoint's) or a hub id (needs network, or the HF cache)."""
    from transformers import AutoTokenizer

    name = os.fspath(path_or_id)
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        where = ("local directory" if os.path.isdir(name) else
                 "path or hub id (no such local directory, so it was looked up on the hub)")
        raise ValueError(f"cannot load a tokenizer from {where} {name!r}: {e}") from e


def tokenizer_name(tokenizer) -> str:
    """The directory or hub id a tokenizer was loaded from, for the manifest ("" if unknown)."""
    return str(getattr(tokenizer, "name_or_path", "") or "")


def encode_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added.

    Fast tokenizers are called through their Rust backend directly: it is the same pipeline
    HF's `__call__` runs, without the per-call Python overhead and without the "sequence longer
    than model_max_length" warning (packing cuts long documents itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [enc.ids for enc in encode(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False,
                     return_attention_mask=False)["input_ids"]


def train_bpe(docs: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
              special_tokens: Sequence[str] = (ENDOFTEXT,), bos_token: str = ENDOFTEXT,
              eos_token: str = ENDOFTEXT, min_frequency: int = 2,
              show_progress: bool = False):
    """Train a byte-level BPE tokenizer on `docs`, save it to `out_dir`, and return it loaded
    back through `AutoTokenizer` (so what the caller gets is exactly what later runs load).

    `vocab_size` counts the 256 byte tokens and the special tokens; on a small corpus BPE may
    run out of merges (pairs seen fewer than `min_frequency` times) and stop below it.
    bos/eos must be among `special_tokens`. Special tokens get the lowest ids, in the order
    given (so `<|endoftext|>` is id 0 by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    for role, tok in (("bos_token", bos_token), ("eos_token", eos_token)):
        if tok not in special_tokens:
            raise ValueError(f"{role}={tok!r} is not among special_tokens={special_tokens}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is below the {len(alphabet)} byte tokens "
                         f"plus {len(special_tokens)} special tokens ({minimum})")

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: " word" and "word" stay different, and decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens, initial_alphabet=alphabet,
                                  show_progress=show_progress)
    tok.train_from_iterator(docs, trainer=trainer)

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token,
                                 clean_up_tokenization_spaces=False)
    hf.save_pretrained(out_dir)
    _set_portable_class(out_dir)
    return load_tokenizer(out_dir)


def _set_portable_class(out_dir: str) -> None:
    """Name the tokenizer class `PreTrainedTokenizerFast`: transformers 5 saves its internal
    `TokenizersBackend`, which transformers 4 (still used by SAELens setups) cannot resolve;
    both versions load the directory as a fast tokenizer under the portable name."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json_atomic(path, cfg)
