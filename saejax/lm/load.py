"""`load_lm`: a local Hugging Face model directory (or hub id) -> saejax `LM`, no torch involved.

config.json is read with transformers.AutoConfig; tensors come from `*.safetensors` (single file,
several files, or sharded with `model.safetensors.index.json`). The module is built abstractly
(`nnx.eval_shape`, no memory) and every parameter is filled from the checkpoint through the
family's weight map, so a tensor the checkpoint lacks is an error that names it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saejax.lm import gpt2, llama, neox
from saejax.lm.convert import Tensor
from saejax.lm.model import LM, LMConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FAMILIES = {"gpt2": gpt2, "gpt_neox": neox, **{t: llama for t in llama.MODEL_TYPES}}

# What a hub download fetches: config, safetensors weights (+ index) and tokenizer files.
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
]


class MissingTensorError(LookupError):
    """The checkpoint lacks a tensor the model needs."""


def resolve_model_dir(path_or_model_id: str | os.PathLike) -> Path:
    """An existing directory as is; something path-like that does not exist is an error; anything
    else is taken as a hub id and downloaded (config, safetensors and tokenizer files only)."""
    s = str(path_or_model_id)
    path = Path(s).expanduser()
    if path.is_dir():
        return path
    # Hub ids are "name" or "org/name"; anything else is meant as a local path.
    if path.exists() or s.startswith(("/", ".", "~")) or s.count("/") > 1 or "\\" in s:
        raise FileNotFoundError(f"model directory {path} does not exist (or is not a directory)")
    from huggingface_hub import snapshot_download  # a transformers dependency; network needed

    try:
        # consolidated.safetensors: Mistral's original-format copy of the same weights.
        return Path(
            snapshot_download(s, allow_patterns=HUB_PATTERNS, ignore_patterns=["consolidated*"])
        )
    except Exception as e:  # offline, unknown repo, gated model...
        raise FileNotFoundError(
            f"{s!r} is not a local directory and could not be fetched from the hub: {e}"
        ) from e


def read_hf_config(model_dir: Path) -> PretrainedConfig:
    """transformers config, after checking config.json exists and its model_type is supported."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} ({cfg_file}) not supported; supported: {sorted(FAMILIES)}"
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def lm_config(path_or_model_id: str | os.PathLike) -> LMConfig:
    """The saejax architecture config of a Hugging Face model directory (no weights read)."""
    hf = read_hf_config(resolve_model_dir(path_or_model_id))
    return FAMILIES[hf.model_type].config_from_hf(hf)


class Checkpoint:
    """Tensor name -> safetensors file, reading one tensor at a time onto host memory."""

    def __init__(self, model_dir: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        where = json.loads(index.read_text())["weight_map"] if index.is_file() else None
        # With an index, only its shards: repos such as Mistral's also ship other-format files.
        files = (
            sorted({*where.values()})
            if where
            else [f.name for f in model_dir.glob("*.safetensors")]
        )
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors files in {model_dir} (other formats are not read)"
            )
        # framework="flax" because numpy cannot hold bfloat16 from safetensors.
        self.handles = {
            f: stack.enter_context(safe_open(str(model_dir / f), framework="flax")) for f in files
        }
        self.where = where or {k: f for f, h in self.handles.items() for k in h.keys()}
        self.model_dir = model_dir

    def read(self, spec: Tensor, param: str) -> np.ndarray:
        for key in spec.keys:
            if key in self.where:
                # Read onto the CPU device: tensors are re-laid-out on the host, never staged on
                # the accelerator in checkpoint layout.
                with jax.default_device(jax.devices("cpu")[0]):
                    arr = np.asarray(self.handles[self.where[key]].get_tensor(key))
                return spec.fn(arr)
        raise MissingTensorError(
            f"checkpoint {self.model_dir} has no tensor {' or '.join(spec.keys)} (for {param})"
        )


def load_lm(path_or_model_id: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> LM:
    """A saejax `LM` from a Hugging Face model directory (or hub id), parameters in `dtype`."""
    model_dir = resolve_model_dir(path_or_model_id)
    hf = read_hf_config(model_dir)
    family = FAMILIES[hf.model_type]
    cfg = family.config_from_hf(hf)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0), dtype=dtype)))
    wmap = family.weight_map(cfg)
    filled = []
    with contextlib.ExitStack() as stack:
        ckpt = Checkpoint(model_dir, stack)
        for path, var in nnx.to_flat_state(abstract):
            name = ".".join(map(str, path))
            if name not in wmap:  # a bug in the family's weight map, not in the checkpoint
                raise RuntimeError(f"{family.__name__}.weight_map does not provide {name}")
            arr = ckpt.read(wmap.pop(name), name)
            want = var.get_value().shape
            if arr.shape != want:
                raise ValueError(
                    f"{name}: checkpoint gives shape {arr.shape}, model expects {want}"
                )
            filled.append((path, var.replace(value=jnp.asarray(arr, dtype))))
    if wmap:
        raise RuntimeError(
            f"{family.__name__}.weight_map names parameters the model lacks: {sorted(wmap)}"
        )
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
