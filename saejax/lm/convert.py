"""Shared pieces of the Hugging Face <-> saejax mapping used by the family modules.

A family module provides `config_from_hf(hf_config) -> LMConfig` and
`weight_map(cfg) -> {saejax param path: Tensor}`, where a `Tensor` names the checkpoint key(s)
to read and the numpy transform into saejax's layout (e.g. transpose torch's [out, in] Linear).
The same table serves saving (`to_checkpoint`): each `Tensor` may also declare the inverse
transform, and a checkpoint tensor fused from several saejax parameters (GPT-2's c_attn) is
named by one entry per piece. A family that can be saved also provides `config_to_hf(cfg)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from saejax.lm.model import RopeConfig

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import PretrainedConfig

Transform = Callable[[np.ndarray], np.ndarray]


def same(a: np.ndarray) -> np.ndarray:
    """The identity transform (checkpoint and saejax layouts agree)."""
    return a


@dataclass(frozen=True)
class Tensor:
    """Read the first of `keys` present in the checkpoint and apply `fn`.

    Saving writes `keys[0]` (the full name, with the base-model prefix) as `inv(param)`; `inv`
    defaults to the identity when `fn` is, and is otherwise required for saving. Several entries
    with the same `keys[0]` and `part` = 0, 1, ... are the pieces of one fused checkpoint tensor:
    their `inv` outputs are concatenated along `axis` in `part` order.
    """

    keys: tuple[str, ...]
    fn: Transform = same
    inv: Transform | None = None
    part: int | None = None
    axis: int = 0

    def inverse(self, param: str) -> Transform:
        if self.inv is not None:
            return self.inv
        if self.fn is same:
            return same
        raise NotImplementedError(
            f"the weight map gives no inverse transform for {param} ({self.keys[0]}): this "
            "family can be loaded but not saved"
        )


def to_checkpoint(
    wmap: Mapping[str, Tensor], params: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """{checkpoint key: array}: saejax parameters {dotted path: array} laid out as the checkpoint
    `wmap` reads them. Every result is read back through `wmap` and must give each parameter
    exactly (transforms are reshapes, slices and transposes), so a wrong inverse fails here."""
    missing, extra = sorted(set(wmap) - set(params)), sorted(set(params) - set(wmap))
    if missing or extra:
        raise ValueError(f"parameters do not match the weight map: missing {missing}, "
                         f"not in the map {extra}")
    groups: dict[str, list[tuple[int | None, str]]] = {}
    for name, spec in wmap.items():
        groups.setdefault(spec.keys[0], []).append((spec.part, name))
    out = {}
    for key, members in groups.items():
        if len(members) == 1 and members[0][0] is None:
            name = members[0][1]
            out[key] = np.ascontiguousarray(wmap[name].inverse(name)(np.asarray(params[name])))
            continue
        members.sort(key=lambda m: -1 if m[0] is None else m[0])
        if [m[0] for m in members] != list(range(len(members))):
            raise ValueError(f"{key}: fused from {[m[1] for m in members]} with parts "
                             f"{[m[0] for m in members]}, expected 0..{len(members) - 1}")
        axes = {wmap[name].axis for _, name in members}
        if len(axes) != 1:
            raise ValueError(f"{key}: pieces disagree on the concatenation axis ({axes})")
        pieces = [wmap[name].inverse(name)(np.asarray(params[name])) for _, name in members]
        out[key] = np.ascontiguousarray(np.concatenate(pieces, axis=axes.pop()))
    for name, spec in wmap.items():
        back, want = np.asarray(spec.fn(out[spec.keys[0]])), np.asarray(params[name])
        if (back.shape, back.dtype) != (want.shape, want.dtype) or (
            np.ascontiguousarray(back).tobytes() != np.ascontiguousarray(want).tobytes()
        ):
            raise RuntimeError(f"weight map round trip of {name} via {spec.keys[0]} is not exact")
    return out


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
