"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = ReLU(TopK(W_enc (x - b_pre) + b_enc));  x̂ = W_dec z + b_pre
    loss = MSE + α · AuxK,  AuxK = MSE(e, ê), e = x - x̂ (a fixed target),
    ê = W_dec · TopK_{k_aux}(pre-activations restricted to dead latents)

b_pre is stored as b_dec (SAELens layout). W_enc starts as W_decᵀ and decoder rows stay unit norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.config import SAEConfig
from saejax.sae.base import SAE, LossContext, reconstruction_metrics


def keep_top_k(pre: jax.Array, k: int) -> jax.Array:
    """Zero all but the k largest entries of each row, then ReLU the kept ones."""
    values, idx = jax.lax.top_k(pre, k)
    rows = jnp.arange(pre.shape[0])[:, None]
    return jnp.zeros_like(pre).at[rows, idx].set(jax.nn.relu(values))


class TopKSAE(SAE):
    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, enc_from_dec=True)
        self.k, self.k_aux, self.aux_coefficient = cfg.k, cfg.k_aux, cfg.aux_coefficient

    def encode(self, x: jax.Array) -> jax.Array:
        return keep_top_k(self.pre_activations(x), self.k)

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        pre = self.pre_activations(x)
        f = keep_top_k(pre, self.k)
        x_hat = self.decode(f)
        metrics = reconstruction_metrics(x, x_hat, f)
        aux = self.aux_loss(pre, x - jax.lax.stop_gradient(x_hat), ctx.dead)
        loss = metrics["mse"] + self.aux_coefficient * aux
        return loss, {**metrics, "aux_loss": aux, "loss": loss, "f": f}

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
