"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders").

    f = BatchTopK(a), selected once over the whole dictionary       (`saejax.sae.batchtopk`)
    x̂_m = f[:, :m] W_dec[:m] + b_dec   for each width m in M = {m_1 < … < m_n = F}
    loss = Σ_{m ∈ M} MSE(x̂_m, x) + α · AuxK(x − x̂_F)

The full width is always one of the levels (the paper's M ends at the dictionary size; SAELens
appends it when missing, saejax's `check` requires it). The sum is unweighted, as in the paper
and SAELens. θ, the inference form (a JumpReLU), AuxK and "dead" are BatchTopK's.

Where the references differ (saejax follows the paper): the authors' code
(bartbussmann/matryoshka_sae) averages instead of summing, over the n levels plus a level of b_dec
alone; SAELens sums the squared error over d_in (saejax: the mean over elements), so each of its
terms is d_in × saejax's; its AuxK is as in `saejax.sae.batchtopk` (its optional per-level AuxK,
`use_matryoshka_aux_loss`, is not the paper's and not here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.errors import ConfigError
from saejax.sae import batchtopk, precision
from saejax.sae.batchtopk import BatchTopKSAE
from saejax.sae.config import SAEConfig


def widths(cfg: SAEConfig) -> tuple[int, ...]:
    """The nested widths in use: `sae.matryoshka.widths`, or by default F/16, F/8, F/4, F/2, F
    (the paper's Gemma-2 split: groups of 1/16, 1/16, 1/8, 1/4, 1/2 of the dictionary)."""
    n = cfg.n_features
    return tuple(cfg.matryoshka.widths) or tuple(sorted({n >> s for s in range(5)} - {0}))


def check(cfg: SAEConfig) -> None:
    batchtopk.check(cfg)
    w, n = cfg.matryoshka.widths, cfg.n_features
    if not w:
        return
    if any(b <= a for a, b in zip(w, w[1:])) or w[0] < 1:
        raise ConfigError(f"sae.matryoshka.widths={w} must be positive and strictly increasing")
    if w[-1] != n:
        raise ConfigError(f"sae.matryoshka.widths={w} must end at sae.n_features={n} (the full "
                          "dictionary is always one of the nested levels)")


class MatryoshkaSAE(BatchTopKSAE):
    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.widths = widths(cfg)

    def errors(self, x: jax.Array, f: jax.Array) -> tuple[jax.Array, jax.Array]:
        """([B] Σ over levels of each input's MSE, x̂ of the full width): each level adds its
        group of latents to the previous level's reconstruction (one [B, F] @ [F, d] of work)."""
        w_dec = self.W_dec[...]
        x_hat, total, start = self.b_dec[...], jnp.zeros(x.shape[:1], jnp.float32), 0
        for end in self.widths:
            x_hat = x_hat + precision.matmul(f[:, start:end], w_dec[start:end], self.dtype,
                                             jnp.float32)
            total = total + jnp.square(x_hat - x).mean(axis=-1)
            start = end
        return total, x_hat
