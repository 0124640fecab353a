"""Logit effects ("logit weights"): which tokens a feature's decoder direction promotes directly.

A feature's decoder row W_dec[j] is what it adds at its site. Taken to the residual stream:

- `blocks.{i}.mlp.hook_post`: through that MLP's output projection, W_dec[j] @ W_out (no bias:
  a direction, not a point), then the linear part of the post-MLP norm where the family has one
  (Gemma 2's sandwich norm);
- residual sites (`hook_resid_pre/mid/post`) and `hook_mlp_out` / `hook_attn_out`: it already
  lives in the residual stream.

Then the direct path to the logits: the final norm's linear part (LayerNorm: subtract the mean,
multiply by the gain; RMSNorm: multiply by the gain) and the unembedding. The norm's division by
the input's scale is ignored, as is standard for logit weights: it depends on the token, and it
rescales every logit alike. Later layers are skipped (this is the *direct* effect): for the last
layer's MLP of a one-layer model it is the exact effect up to the final norm's scale (and the
norm's small projection off the current residual direction); for earlier sites it is only the
part that reaches the logits without passing another block. A final logit softcap is ignored
(monotonic per logit).

Features are processed in chunks of F so 100k+ features never hold [F, vocab] at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
_SITE = re.compile(r"blocks\.(\d+)\.(.+)")
RESIDUAL_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out",
                  "hook_attn_out")


@dataclass
class LogitEffects:
    """Top-n promoted and suppressed tokens per feature (host numpy)."""

    promoted_ids: np.ndarray
    """[F, n] int32 token ids with the largest logit effect, largest first."""
    promoted: np.ndarray
    """[F, n] float32 their logit effects."""
    suppressed_ids: np.ndarray
    """[F, n] int32 token ids with the most negative effect, most negative first."""
    suppressed: np.ndarray
    """[F, n] float32 their logit effects."""


class DirectPath(NamedTuple):
    """The arrays of a site's direct path to the logits (a pytree: pass it as a jit argument)."""

    proj: jax.Array | None
    """[d_site, d_model] the MLP's output projection (mlp.hook_post sites), else None."""
    post_gain: jax.Array | None
    """[d_model] gain of the post-MLP norm (Gemma 2 sandwich norm), else None."""
    final_gain: jax.Array
    """[d_model] gain of the final norm."""
    w_u: jax.Array
    """[d_model, vocab] unembedding (the transposed embedding for tied models)."""


def _gain(norm) -> jax.Array:
    scale = norm.scale[...].astype(F32)
    return 1.0 + scale if norm.offset else scale


def direct_path(lm, site: str) -> DirectPath:
    """The direct path of `site` in the saejax LM `lm` (module docstring)."""
    m = _SITE.fullmatch(site)
    if m is None or site not in lm.hook_names():
        raise ValueError(f"unknown hook site {site!r}; valid names are: "
                         f"{', '.join(lm.hook_names())}")
    block = lm.blocks[int(m.group(1))]
    kind = m.group(2)
    if kind not in ("mlp.hook_post", *RESIDUAL_SITES):
        raise ValueError(f"logit effects for site kind {kind!r} are not defined")
    mlp = kind == "mlp.hook_post"
    w_u = lm.embed[...].T if lm.unembed is None else lm.unembed[...]
    return DirectPath(
        block.mlp.w_out[...].astype(F32) if mlp else None,
        _gain(block.ln2_post) if mlp and block.ln2_post is not None else None,
        _gain(lm.ln_final), w_u.astype(F32))


def site_width(path: DirectPath) -> int:
    return int(path.proj.shape[0] if path.proj is not None else path.w_u.shape[0])


def direct_logits(path: DirectPath, w_dec: jax.Array, center: bool) -> jax.Array:
    """[n, vocab] direct logit effects of decoder rows w_dec [n, d_site].

    center: the model's norms are LayerNorms (subtract the mean) rather than RMSNorms."""
    def norm_linear(v, gain):  # the norm without its division by the input's scale
        return (v - v.mean(-1, keepdims=True) if center else v) * gain

    v = w_dec.astype(F32)
    if path.proj is not None:
        v = v @ path.proj
    if path.post_gain is not None:
        v = norm_linear(v, path.post_gain)
    return norm_linear(v, path.final_gain) @ path.w_u


def logit_effects(lm, site: str, w_dec: jax.Array, n: int = 10,
                  chunk_elements: int = 1 << 25) -> LogitEffects:
    """Top-n promoted/suppressed tokens of every feature's decoder row w_dec [F, d_site],
    computed chunk features at a time (chunk * vocab <= chunk_elements; the last chunk is
    padded, so one compile)."""
    path = direct_path(lm, site)
    if w_dec.ndim != 2 or w_dec.shape[1] != site_width(path):
        raise ValueError(f"W_dec has shape {tuple(w_dec.shape)} but site {site} has width "
                         f"{site_width(path)} (expected [F, {site_width(path)}])")
    F, vocab = int(w_dec.shape[0]), int(path.w_u.shape[1])
    n = min(n, vocab)
    chunk = max(1, min(F, chunk_elements // vocab))
    center = lm.cfg.norm != "rmsnorm"

    @jax.jit
    def top(path, rows):
        logits = direct_logits(path, rows, center)
        pv, pi = jax.lax.top_k(logits, n)
        sv, si = jax.lax.top_k(-logits, n)
        return pi, pv, si, -sv

    parts = []
    for lo in range(0, F, chunk):
        rows = jnp.asarray(w_dec[lo:lo + chunk])
        m = rows.shape[0]
        if m < chunk:
            rows = jnp.pad(rows, ((0, chunk - m), (0, 0)))
        parts.append([np.asarray(a)[:m] for a in jax.device_get(top(path, rows))])
    pi, pv, si, sv = (np.concatenate(p) for p in zip(*parts))
    return LogitEffects(pi.astype(np.int32), pv, si.astype(np.int32), sv)
