"""`save_hf`: a saejax `LM` (or its parameters) -> a Hugging Face model directory.

The inverse of `saejax.lm.load.load_lm`. Writes `config.json` (the family's transformers config,
from `config_to_hf`), `model.safetensors` (tensor names and layouts from the family's one
`weight_map`, the same table `load_lm` reads through; a tied unembedding is not stored, as
transformers itself does) and, if given, the tokenizer files. The directory is written next to
its destination and renamed into place (`saejax.atomic.atomic_dir`), so a reader never sees half
a model. GPT-2 (including the Towards Monosemanticity one-layer ReLU model) can be saved;
families whose weight map declares no inverse transforms raise NotImplementedError.

The result loads in transformers (`GPT2LMHeadModel.from_pretrained(dir)`) and back in saejax
(`load_lm(dir)` gives bit-identical parameters).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from saejax.atomic import atomic_dir
from saejax.lm.convert import to_checkpoint
from saejax.lm.load import FAMILIES
from saejax.lm.model import LM, LMConfig

# Tokenizer files copied from `tokenizer_dir` (what AutoTokenizer reads; no model files).
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
)

Params = LM | nnx.State | Mapping[str, Any]


def flat_params(lm_or_params: Params) -> dict[str, np.ndarray]:
    """{dotted parameter path: host array} of an LM, an nnx.State, a nested pure dict
    (`nnx.to_pure_dict`) or an already flat {dotted path: array} dict."""
    if isinstance(lm_or_params, nnx.Module):
        lm_or_params = nnx.state(lm_or_params, nnx.Param)
    if isinstance(lm_or_params, nnx.State):
        flat = {
            ".".join(map(str, path)): var.get_value()
            for path, var in nnx.to_flat_state(lm_or_params)
        }
    else:
        flat = {}

        def walk(tree: Mapping[str, Any], prefix: str) -> None:
            for key, value in tree.items():
                if isinstance(value, Mapping):
                    walk(value, f"{prefix}{key}.")
                else:
                    flat[f"{prefix}{key}"] = value

        walk(lm_or_params, "")
    return {k: np.asarray(v) for k, v in jax.device_get(flat).items()}


def save_hf(
    lm_or_params: Params,
    lm_config: LMConfig | None,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    **hf_config: Any,
) -> Path:
    """Write `lm_or_params` as a Hugging Face model directory `out_dir`; return its path.

    lm_config: the architecture (None = `lm_or_params.cfg` when an LM is given).
    tokenizer_dir: a tokenizer directory whose tokenizer files are copied alongside, so
        `AutoTokenizer.from_pretrained(out_dir)` works too.
    overwrite: replace an existing `out_dir` (otherwise FileExistsError).
    hf_config: extra fields of the transformers config, e.g. bos_token_id, eos_token_id.

    Parameters are written in their own dtype. In a multi-process run only process 0 writes; the
    parameters must be fully addressable there (replicated, as the LM rules table has them).
    """
    if lm_config is None:
        if not isinstance(lm_or_params, LM):
            raise ValueError("lm_config is required unless an LM module is given")
        lm_config = lm_or_params.cfg
    family = FAMILIES.get(lm_config.model_type)
    if family is None or not hasattr(family, "config_to_hf"):
        raise NotImplementedError(
            f"saving model_type {lm_config.model_type!r} is not supported (supported: gpt2)"
        )
    hf = family.config_to_hf(lm_config, **hf_config)
    tensors = to_checkpoint(family.weight_map(lm_config), flat_params(lm_or_params))
    tok_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    hf.dtype = str(next(iter(tensors.values())).dtype)  # informational ("float32")

    out = Path(out_dir).absolute()
    if jax.process_index() != 0:
        return out
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    from safetensors.numpy import save_file

    with atomic_dir(out) as tmp:
        hf.to_json_file(str(tmp / "config.json"), use_diff=False)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in tok_files:
            shutil.copy2(f, tmp / f.name)
    return out


def tokenizer_files(tokenizer_dir: str | os.PathLike) -> list[Path]:
    """The tokenizer files in a directory ([] if it is not a directory or holds none)."""
    d = Path(tokenizer_dir)
    if not d.is_dir():
        return []
    return sorted(
        f for f in d.iterdir()
        if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in TOKENIZER_PATTERNS)
    )  # fmt: skip


def _tokenizer_files(tokenizer_dir: str | os.PathLike) -> list[Path]:
    files = tokenizer_files(tokenizer_dir)
    if not files:
        raise FileNotFoundError(f"{tokenizer_dir} is not a directory holding tokenizer files "
                                f"({', '.join(TOKENIZER_PATTERNS)})")
    return files
