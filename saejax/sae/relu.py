"""ReLU SAE with L1 penalty: Towards Monosemanticity, and its Anthropic 2024 options.

    x̄ = x - b_d;  f = ReLU(W_e x̄ + b_e);  x̂ = W_d f + b_d
    loss = MSE (mean over vector elements) + λ_t · Σ_features |f_i| · w_i

w_i = 1 with the unit-norm decoder; w_i = ||W_dec[i]|| with `decoder_norm="l1_weighted"`
(Anthropic 2024), where the decoder norm is left free instead. λ_t = λ·min(1, (t+1)/warm-up),
times the factor an L0 target has set, and λ is defined on normalised inputs: on raw inputs
x (norm scale s, E||s·x||² = d_in) the loss is the normalised one divided by s², so λ/s applies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.errors import ConfigError
from saejax.sae.base import SAE, LossContext
from saejax.sae.config import SAEConfig
from saejax.sae.stats import reconstruction_metrics
from saejax.sae.decoder_norm import row_norms


TARGET_RATE = 0.01
"""With `target_l0`, log λ moves by at most this much per step (an e-fold in 100 steps)."""

DATA_FIELDS = ("relu.l1_coefficient", "relu.l1_warmup_fraction", "relu.target_l0",
               "relu.init_enc_from_dec")
"""`Family.data_fields`: λ, its warm-up and target are `hparams`; init_enc_from_dec only
initialises."""


def hparams(cfg: SAEConfig, steps: int, batch_size: int) -> dict[str, float]:
    r = cfg.relu
    return {"l1_coefficient": r.l1_coefficient, "target_l0": r.target_l0,
            "l1_warmup_steps": float(round(r.l1_warmup_fraction * steps))}


def init_state(cfg: SAEConfig) -> dict[str, jax.Array]:
    """log of the factor the L0 target has applied to λ (0 without a target)."""
    return {"log_l1_factor": jnp.zeros((), jnp.float32)}


def l1_coefficient(ctx: LossContext) -> jax.Array:
    """λ at ctx.step in the units of the SAE's inputs: the warm-up ramp, the L0 target's factor,
    and λ/s when the inputs are not normalised (s = `LossContext.scale_to_norm`)."""
    warm = ctx.hparams["l1_warmup_steps"]
    ramp = jnp.minimum(1.0, (jnp.asarray(ctx.step, jnp.float32) + 1) / jnp.maximum(warm, 1.0))
    lam = ctx.hparams["l1_coefficient"] * jnp.exp(ctx.state["log_l1_factor"])
    return lam * jnp.where(warm > 0, ramp, 1.0) / ctx.scale_to_norm


def next_l1_factor(ctx: LossContext, l0: jax.Array) -> jax.Array:
    """The L0 target's controller: log λ follows log(L0 / target), clipped, once warmed up."""
    target = ctx.hparams["target_l0"]
    error = jnp.clip(jnp.log((l0 + 0.1) / jnp.maximum(target, 1e-6)), -1.0, 1.0)
    active = (target > 0) & (jnp.asarray(ctx.step, jnp.float32) >= ctx.hparams["l1_warmup_steps"])
    old = ctx.state["log_l1_factor"]
    return jnp.where(active, jnp.clip(old + TARGET_RATE * jax.lax.stop_gradient(error), -20, 20),
                     old)


def check_l0_target(cfg: SAEConfig, section: str, coefficient: str) -> None:
    """Settings of a family using this L0 controller (`sae.<section>.target_l0` and the
    coefficient it scales) that cannot work, as a ConfigError naming the field."""
    sec = getattr(cfg, section)
    if sec.target_l0 >= cfg.n_features:
        raise ConfigError(f"sae.{section}.target_l0={sec.target_l0} must be below "
                          f"sae.n_features={cfg.n_features}")
    if sec.target_l0 > 0 and getattr(sec, coefficient) == 0:
        raise ConfigError(f"sae.{section}.{coefficient} must be > 0 when target_l0 > 0 (the "
                          "target scales it; 0 would stay 0)")


class ReluSAE(SAE):
    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, enc_from_dec=cfg.relu.init_enc_from_dec)
        self.unit_norm_decoder = cfg.relu.decoder_norm == "unit"

    def encode(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.pre_activations(x))

    def _l1(self, f: jax.Array) -> jax.Array:
        """[B] Σ_i |f_i|·w_i per input, summed in float32 (f may be bfloat16)."""
        weights = 1.0 if self.unit_norm_decoder else row_norms(self.W_dec[...])
        return jnp.sum(jnp.abs(f) * weights, axis=-1, dtype=jnp.float32)

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        f = self.encode(x)
        x_hat = self.decode(f)
        l1 = self._l1(f).mean()
        metrics = reconstruction_metrics(x, x_hat, self.fired(f))
        lam = l1_coefficient(ctx)
        loss = metrics["mse"] + lam * l1
        state = {"log_l1_factor": next_l1_factor(ctx, metrics["l0"])}
        return loss, {**metrics, "l1": l1, "loss": loss, "l1_coefficient": lam * ctx.scale_to_norm,
                      "fired": self.fire_counts(f), "state": state}

    def per_input_loss(self, x: jax.Array, ctx: LossContext) -> jax.Array:
        f = self.encode(x)
        mse = jnp.square(self.decode(f) - x).mean(axis=-1)
        return mse + l1_coefficient(ctx) * self._l1(f)
