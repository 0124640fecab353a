"""ReLU SAE with L1 penalty: Towards Monosemanticity, and its Anthropic 2024 options.

    x̄ = x - b_d;  f = ReLU(W_e x̄ + b_e);  x̂ = W_d f + b_d
    loss = MSE (mean over vector elements) + λ · Σ_features |f_i| · w_i

w_i = 1 with the unit-norm decoder; w_i = ||W_dec[i]|| with `decoder_norm="l1_weighted"`
(Anthropic 2024), where the decoder norm is left free instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.config import SAEConfig
from saejax.sae.base import SAE, LossContext, reconstruction_metrics
from saejax.sae.decoder_norm import row_norms


class ReluSAE(SAE):
    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, enc_from_dec=cfg.init_enc_from_dec)
        self.unit_norm_decoder = cfg.decoder_norm == "unit"

    def encode(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.pre_activations(x))

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        f = self.encode(x)
        x_hat = self.decode(f)
        weights = 1.0 if self.unit_norm_decoder else row_norms(self.W_dec[...])
        l1 = jnp.sum(jnp.abs(f) * weights, axis=-1).mean()
        metrics = reconstruction_metrics(x, x_hat, f)
        loss = metrics["mse"] + ctx.l1_coefficient * l1
        return loss, {**metrics, "l1": l1, "loss": loss, "f": f}

    def per_input_loss(self, x: jax.Array, l1_coefficient) -> jax.Array:
        """[B] loss of each input (used to pick resampling candidates)."""
        f = self.encode(x)
        mse = jnp.square(self.decode(f) - x).mean(axis=-1)
        weights = 1.0 if self.unit_norm_decoder else row_norms(self.W_dec[...])
        return mse + l1_coefficient * jnp.sum(jnp.abs(f) * weights, axis=-1)
