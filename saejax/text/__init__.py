"""Text to tokens: document sources, tokenizers, and packed token datasets on disk.

    Corpus (files / JSON lines / HF datasets) ──tokenizer──▶ Packer ──▶ tokens_*.npy + manifest.json

`corpus` yields documents, `tokenizer` loads HF tokenizers or trains a byte-level BPE offline,
`tokens` packs token streams into fixed-length contexts and reads them back (`TokenDataset`),
`labels` says what tokens are as text (their bytes, display strings and writing systems);
`tokenize` is the `saejax tokenize` command (every check first, then an atomic write).
transformers, tokenizers and datasets are imported only where used.
"""

from __future__ import annotations

from saejax.text.corpus import Corpus, expand_text_paths, iter_hf_dataset, iter_jsonl_files, \
    iter_text_files, split_documents
from saejax.text.tokenizer import ENDOFTEXT, encode_batch, load_tokenizer, train_bpe
from saejax.text.tokens import BOS_MODES, Packer, TokenDataset, pack_contexts, read_manifest, \
    token_dtype, write_token_dataset

__all__ = [
    "BOS_MODES", "Corpus", "ENDOFTEXT", "Packer", "TokenDataset", "encode_batch",
    "expand_text_paths", "iter_hf_dataset", "iter_jsonl_files", "iter_text_files",
    "load_tokenizer", "pack_contexts", "read_manifest", "split_documents", "token_dtype",
    "train_bpe", "write_token_dataset",
]
