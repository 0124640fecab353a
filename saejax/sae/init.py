"""Data-dependent initialisation: geometric median for b_dec, and the input-scaling scalar."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def geometric_median(x: jax.Array, iters: int = 100, eps: float = 1e-8) -> jax.Array:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to rows of x.

    Each iteration re-weights points by 1/distance; starting from the mean it converges to the
    geometric median (the paper's b_d initialisation), robust to outliers unlike the mean.
    """
    def step(y, _):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=1), eps)
        return (w[:, None] * x).sum(0) / w.sum(), None

    y, _ = jax.lax.scan(step, x.mean(axis=0), None, length=iters)
    return y


def input_scale(x: jax.Array) -> jax.Array:
    """Scalar s with E||s·x||² = d_in (Anthropic 2024 input normalisation), over the rows that
    are finite (a bad row in the sample is the data's fault, reported when it is trained on)."""
    sq = jnp.sum(jnp.square(x), axis=-1)
    ok = jnp.isfinite(sq)
    return jnp.sqrt(x.shape[-1] * jnp.maximum(ok.sum(), 1) / jnp.sum(jnp.where(ok, sq, 0.0)))
