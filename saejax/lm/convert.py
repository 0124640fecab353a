"""Shared pieces of the Hugging Face -> saejax mapping used by the family modules.

A family module provides `config_from_hf(hf_config) -> LMConfig` and
`weight_map(cfg) -> {saejax param path: Tensor}`, where a `Tensor` names the checkpoint key(s)
to read and the numpy transform into saejax's layout (e.g. transpose torch's [out, in] Linear).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from saejax.lm.model import RopeConfig

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import PretrainedConfig

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tensor:
    """Read the first of `keys` present in the checkpoint and apply `fn`."""

    keys: tuple[str, ...]
    fn: Transform = lambda a: a


def names(prefix: str, name: str) -> tuple[str, ...]:
    """A key with and without the base-model prefix: checkpoints saved from the bare model
    (e.g. the original `gpt2` on the hub) lack `transformer.` / `model.`."""
    return (prefix + name, name)


def linear(*shape: int) -> Transform:
    """torch Linear weight [out, in] -> [in, *shape] (shape splits `out`, e.g. heads, d_head)."""
    return lambda a: a.T.reshape(a.shape[1], *shape) if shape else a.T


def linear_heads_in(*shape: int) -> Transform:
    """torch Linear weight [out, in] -> [*shape, out] (shape splits `in`: heads, d_head)."""
    return lambda a: a.T.reshape(*shape, a.shape[0])


def reshape(*shape: int) -> Transform:
    return lambda a: a.reshape(*shape)


def rope_from_hf(hf: PretrainedConfig, head_dim: int) -> RopeConfig:
    """RopeConfig from transformers 5's `rope_parameters` (or the older rope_theta/rope_scaling)."""
    rp = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if rp and all(isinstance(v, dict) for v in rp.values()):
        raise NotImplementedError("per-layer-type rope parameters are not supported")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise NotImplementedError(f"rope_type {kind!r} not supported (default, linear, llama3)")
    partial = rp.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    return RopeConfig(
        dim=int(head_dim * partial),
        theta=float(rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        scaling=kind,
        factor=float(rp.get("factor", 1.0)),
        low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
        original_max_positions=int(rp.get("original_max_position_embeddings", 8192)),
    )


def sliding_windows(hf: PretrainedConfig) -> tuple[int | None, ...]:
    """Per-layer attention windows: `layer_types` (Qwen2/3, Gemma 2) or Mistral's global one."""
    window = getattr(hf, "sliding_window", None)
    if window is None:
        return ()
    types = getattr(hf, "layer_types", None)
    if types is None:  # Mistral: one window for every layer
        return (int(window),) * hf.num_hidden_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in types)
