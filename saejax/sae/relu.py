"""ReLU SAE with L1 penalty: Towards Monosemanticity, and its Anthropic 2024 options.

    x̄ = x - b_d;  f = ReLU(W_e x̄ + b_e);  x̂ = W_d f + b_d
    loss = MSE (mean over vector elements) + λ_t · Σ_features |f_i| · w_i

w_i = 1 with the unit-norm decoder; w_i = ||W_dec[i]|| with `decoder_norm="l1_weighted"`
(Anthropic 2024), where the decoder norm is left free instead. λ_t = λ·min(1, (t+1)/warm-up).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.sae.base import SAE, LossContext
from saejax.sae.config import SAEConfig
from saejax.sae.stats import reconstruction_metrics
from saejax.sae.decoder_norm import row_norms


def hparams(cfg: SAEConfig) -> dict[str, float]:
    return {"l1_coefficient": cfg.relu.l1_coefficient,
            "l1_warmup_steps": float(cfg.relu.l1_warmup_steps)}


def l1_coefficient(ctx: LossContext) -> jax.Array:
    """λ at ctx.step, with the optional linear warm-up (warm-up 0 = off)."""
    lam, warm = ctx.hparams["l1_coefficient"], ctx.hparams["l1_warmup_steps"]
    ramp = jnp.minimum(1.0, (jnp.asarray(ctx.step, jnp.float32) + 1) / jnp.maximum(warm, 1.0))
    return lam * jnp.where(warm > 0, ramp, 1.0)


class ReluSAE(SAE):
    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, enc_from_dec=cfg.relu.init_enc_from_dec)
        self.unit_norm_decoder = cfg.relu.decoder_norm == "unit"

    def encode(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.pre_activations(x))

    def _l1(self, f: jax.Array) -> jax.Array:
        """[B] Σ_i |f_i|·w_i per input."""
        weights = 1.0 if self.unit_norm_decoder else row_norms(self.W_dec[...])
        return jnp.sum(jnp.abs(f) * weights, axis=-1)

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        f = self.encode(x)
        x_hat = self.decode(f)
        l1 = self._l1(f).mean()
        metrics = reconstruction_metrics(x, x_hat, self.fired(f))
        loss = metrics["mse"] + l1_coefficient(ctx) * l1
        return loss, {**metrics, "l1": l1, "loss": loss, "f": f}

    def per_input_loss(self, x: jax.Array, ctx: LossContext) -> jax.Array:
        f = self.encode(x)
        mse = jnp.square(self.decode(f) - x).mean(axis=-1)
        return mse + l1_coefficient(ctx) * self._l1(f)
