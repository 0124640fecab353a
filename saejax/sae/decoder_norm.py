"""Unit-norm decoder handling (Towards Monosemanticity): rows of W_dec [F, d] kept at unit norm.

Before the optimizer step the gradient component parallel to each row is removed (so Adam does
not spend its step growing the norm), and after it the rows are renormalised.
"""

import jax
import jax.numpy as jnp

_EPS = 1e-12


def row_norms(w_dec: jax.Array) -> jax.Array:
    return jnp.linalg.norm(w_dec, axis=-1)


def unit_rows(w_dec: jax.Array) -> jax.Array:
    return w_dec / jnp.maximum(row_norms(w_dec), _EPS)[..., None]


def remove_parallel(grad: jax.Array, w_dec: jax.Array) -> jax.Array:
    """grad minus its projection on each (unit) decoder row."""
    w = unit_rows(w_dec)
    return grad - jnp.sum(grad * w, axis=-1, keepdims=True) * w
