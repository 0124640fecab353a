"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = ReLU(TopK(W_enc (x - b_pre) + b_enc));  x̂ = W_dec z + b_pre
    loss = MSE + α · AuxK,  AuxK = MSE(e, ê), e = x - x̂ (a fixed target),
    ê = W_dec · TopK_{k_aux}(pre-activations restricted to dead latents)

b_pre is stored as b_dec (SAELens layout). W_enc starts as W_decᵀ and decoder rows stay unit norm.
A latent is dead for AuxK when it has not fired in `dead_tokens_aux` tokens (α and the window
arrive as data, `hparams`; k and k_aux are shapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.errors import ConfigError
from saejax.sae.base import SAE, LossContext
from saejax.sae.config import SAEConfig, k_aux
from saejax.sae.stats import reconstruction_metrics


AUX_WINDOW_TOKENS = 10_000_000
"""Gao et al.'s AuxK window: dead = no activation in 10M tokens."""


def hparams(cfg: SAEConfig, steps: int, batch_size: int) -> dict[str, float]:
    window = cfg.topk.dead_tokens_aux or min(AUX_WINDOW_TOKENS, steps * batch_size // 10)
    return {"aux_coefficient": cfg.topk.aux_coefficient, "dead_tokens_aux": float(window)}


def check(cfg: SAEConfig) -> None:
    t, n = cfg.topk, cfg.n_features
    if not 0 < t.k <= n:
        raise ConfigError(f"sae.topk.k={t.k} must be in [1, sae.n_features={n}]")
    if not 0 <= t.k_aux <= n:
        raise ConfigError(f"sae.topk.k_aux={t.k_aux} must be in [0, sae.n_features={n}] "
                          "(0 = d_in/2)")


def saelens_options(cfg: SAEConfig) -> dict:
    return {"k": cfg.topk.k, "rescale_acts_by_decoder_norm": False}


def from_saelens(cfg_json: dict) -> dict:
    """`sae` fields of a SAELens topk cfg.json (one that rescales by decoder norm is another
    function, not this family)."""
    if cfg_json.get("rescale_acts_by_decoder_norm"):
        raise ValueError("rescale_acts_by_decoder_norm=true is not supported")
    if cfg_json.get("k") is None:
        raise ValueError("architecture 'topk' needs 'k'")
    return {"topk": {"k": int(cfg_json["k"])}}


def keep_top_k(pre: jax.Array, k: int) -> jax.Array:
    """Zero all but the k largest entries of each row, then ReLU the kept ones."""
    values, idx = jax.lax.top_k(pre, k)
    rows = jnp.arange(pre.shape[0])[:, None]
    return jnp.zeros_like(pre).at[rows, idx].set(jax.nn.relu(values))


class TopKSAE(SAE):
    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, enc_from_dec=True)
        self.k, self.k_aux = cfg.topk.k, k_aux(cfg)

    def encode(self, x: jax.Array) -> jax.Array:
        return keep_top_k(self.pre_activations(x), self.k)

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        pre = self.pre_activations(x)
        f = keep_top_k(pre, self.k)
        x_hat = self.decode(f)
        metrics = reconstruction_metrics(x, x_hat, self.fired(f))
        aux = self.aux_loss(pre, x - jax.lax.stop_gradient(x_hat), self.dead(ctx, x.shape[0]))
        loss = metrics["mse"] + ctx.hparams["aux_coefficient"] * aux
        return loss, {**metrics, "aux_loss": aux, "loss": loss, "fired": self.fire_counts(f)}

    @staticmethod
    def dead(ctx: LossContext, batch_size: int) -> jax.Array | None:
        """[F] bool: latents that have not fired in the last dead_tokens_aux tokens."""
        if ctx.steps_since_fired is None:
            return None
        window = jnp.ceil(ctx.hparams["dead_tokens_aux"] / batch_size).astype(jnp.int32)
        return ctx.steps_since_fired >= window

    def aux_loss(self, pre: jax.Array, residual: jax.Array, dead: jax.Array | None) -> jax.Array:
        """Reconstruct the main model's residual from the top k_aux dead latents (0 if none)."""
        if dead is None:
            return jnp.zeros(())

        def aux(pre: jax.Array, residual: jax.Array) -> jax.Array:
            masked = jnp.where(dead, pre, jnp.finfo(pre.dtype).min)
            e_hat = keep_top_k(masked, self.k_aux) @ self.W_dec[...]
            return jnp.square(e_hat - jax.lax.stop_gradient(residual)).mean()

        # A cond, not a where: steps with no dead latent (all steps of the first dead window, and
        # runs where none die) skip the k_aux top-k, its scatter, a dense [B,F]@[F,d] product
        # and their gradients.
        return jax.lax.cond(dead.any(), aux, lambda pre, _: jnp.zeros((), pre.dtype),
                            pre, residual)
