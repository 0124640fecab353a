"""The small interface every SAE family implements, and the parameters they share.

An SAE holds W_enc [d_in, F], b_enc [F], W_dec [F, d_in], b_dec [d_in] (SAELens layout: row i
of W_dec is feature i's decoder direction, the paper's "decoder column"). Families differ in
`encode` and `loss`; decoding, "fired" and decoder-norm handling are shared.

All methods are pure functions of the parameters, so the train step can `nnx.merge` the module
from a plain dict inside `jax.jit` (and, later, under `jax.vmap` over a leading "which SAE" axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.config import SAEConfig
from saejax.sae import decoder_norm

# Logical axis names of each parameter; saejax.sharding maps them to mesh axes.
AXES = {
    "W_enc": ("d_in", "d_sae"),
    "b_enc": ("d_sae",),
    "W_dec": ("d_sae", "d_in"),
    "b_dec": ("d_in",),
}


@dataclass(frozen=True)
class LossContext:
    """Per-step inputs to the loss that are not parameters or data."""

    l1_coefficient: jax.Array | float = 0.0
    """Current λ (after warm-up) for L1-penalised families."""
    dead: jax.Array | None = None
    """[F] bool: latents that count as dead (used by TopK's AuxK loss)."""


def _param(value: jax.Array, name: str) -> nnx.Param:
    return nnx.Param(value, out_sharding=AXES[name], eager_sharding=False)


def random_directions(key: jax.Array, n: int, d: int) -> jax.Array:
    """n random unit vectors in d dims, one per row."""
    w = jax.random.normal(key, (n, d), jnp.float32)
    return w / jnp.linalg.norm(w, axis=1, keepdims=True)


class SAE(nnx.Module):
    """Base class: parameters, decoding and the metrics every family reports."""

    unit_norm_decoder: bool = True

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs, enc_from_dec: bool):
        d, n = cfg.d_in, cfg.n_features
        w_dec = random_directions(rngs.params(), n, d)
        if enc_from_dec:
            w_enc = w_dec.T
        else:  # Kaiming-uniform, as nn.Linear
            bound = 1.0 / jnp.sqrt(d)
            w_enc = jax.random.uniform(rngs.params(), (d, n), jnp.float32, -bound, bound)
        self.W_enc = _param(w_enc, "W_enc")
        self.b_enc = _param(jnp.zeros((n,), jnp.float32), "b_enc")
        self.W_dec = _param(w_dec, "W_dec")
        self.b_dec = _param(jnp.zeros((d,), jnp.float32), "b_dec")
        self.cfg = cfg

    def pre_activations(self, x: jax.Array) -> jax.Array:
        """W_enc (x - b_dec) + b_enc: the paper's x̄ = x - b_d, then the encoder.

        The value is bit for bit that of `(x - b_dec) @ W_enc + b_enc`, but b_dec's gradient
        through the encoder goes through the [d]@[d,F] product of the second term. Written the
        plain way, autodiff forms dpre @ W_encᵀ ([B,F]@[F,d]) and then sums it over the batch:
        a sixth full matmul that the step does not need.
        """
        b_dec, w_enc = self.b_dec[...], self.W_enc[...]
        held = jax.lax.stop_gradient(b_dec)
        return (x - held) @ w_enc + (self.b_enc[...] - (b_dec - held) @ w_enc)

    def encode(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def decode(self, f: jax.Array) -> jax.Array:
        return f @ self.W_dec[...] + self.b_dec[...]

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        """(scalar loss, aux) where aux holds `f` and the per-step metrics."""
        raise NotImplementedError

    @staticmethod
    def fired(f: jax.Array) -> jax.Array:
        """What counts as a feature firing on a token: a nonzero activation."""
        return f > 0

    # Decoder-norm handling, applied by the train step around the optimizer update.
    def prepare_grads(self, params: dict, grads: dict) -> dict:
        if not self.unit_norm_decoder:
            return grads
        return {**grads, "W_dec": decoder_norm.remove_parallel(grads["W_dec"], params["W_dec"])}

    def constrain(self, params: dict) -> dict:
        if not self.unit_norm_decoder:
            return params
        return {**params, "W_dec": decoder_norm.unit_rows(params["W_dec"])}


def reconstruction_metrics(x: jax.Array, x_hat: jax.Array, f: jax.Array) -> dict:
    """MSE (mean over elements), FVU, L0 for one batch."""
    err = jnp.square(x_hat - x)
    total_var = jnp.sum(jnp.square(x - x.mean(axis=0)))
    return {
        "mse": err.mean(),
        "fvu": err.sum() / jnp.maximum(total_var, 1e-12),
        "l0": SAE.fired(f).sum(axis=-1).mean(),
    }
