"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = ReLU(TopK(W_enc (x - b_pre) + b_enc));  x̂ = W_dec z + b_pre
    loss = MSE + α · AuxK,  AuxK = MSE(e, ê), e = x - x̂ (a fixed target),
    ê = W_dec · TopK_{k_aux}(pre-activations restricted to dead latents)

b_pre is stored as b_dec (SAELens layout). W_enc starts as W_decᵀ and decoder rows stay unit norm.
A latent is dead for AuxK when it has not fired in `dead_tokens_aux` tokens (α and the window
arrive as data, `hparams`; k_aux is a shape; k is compiled as a bound, the step keeping the
k_max = `sae.topk.k` largest and masking ranks ≥ the k in `hparams`, so a sweep varies k in one
step: `Family.bound_fields`).

The training loss has two paths with the same values and gradients (`sae.topk.path`): dense
([B,F] codes, dense products, as written above) and sparse (`saejax.sae.topk_sparse`: codes as
values and indices, one encoder product, gathers and scatters of k rows per token, no [B,F]
array kept). `encode` always returns the dense [B,F] codes, for evaluation and analysis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.errors import ConfigError
from saejax.sae import batching, precision, topk_sparse
from saejax.sae.base import SAE, LossContext
from saejax.sae.config import SAEConfig, k_aux
from saejax.sae.stats import reconstruction_metrics


AUX_WINDOW_TOKENS = 10_000_000
"""Gao et al.'s AuxK window: dead = no activation in 10M tokens."""

SPARSE_BELOW = {"cpu": 1 / 32, "gpu": 1 / 512, "tpu": 1 / 512}
"""`sae.topk.path=auto` takes the sparse path when k/F is at most this on the platform. CPU,
measured (one process, 2 cores, d=512, process CPU time of dense / sparse steps): 4.4× at
k/F = 1/2048 (B=4096, F=65536, k=32), 2.8× at 1/512, 1.6× at 1/64, 1.1× at 1/32, 0.76× at 1/16,
0.5× at 1/8 (B=1024, F=16384 or 4096). GPU/TPU: estimated from an H200's figures (a scatter-add
of the W_dec gradient, B·k rows, 1.1 ms against 3.4 ms for a whole [B,d]@[d,F] bfloat16 product
at k/F = 1/4096): the sparse backward's gathers and scatters cost a product's time per ~300×
fewer entries, so sparse wins below about 1/300 (1/512 leaves a margin); to be confirmed on
the device."""

DATA_FIELDS = ("topk.aux_coefficient", "topk.dead_tokens_aux")
"""`Family.data_fields`: AuxK's weight and window are `hparams` (k and k_aux are shapes)."""


BOUND_FIELDS = ("topk.k",)
"""`Family.bound_fields`: k is data up to the k the step is compiled for."""


def hparams(cfg: SAEConfig, steps: int, batch_size: int) -> dict[str, float]:
    window = cfg.topk.dead_tokens_aux or min(AUX_WINDOW_TOKENS, steps * batch_size // 10)
    return {"aux_coefficient": cfg.topk.aux_coefficient, "dead_tokens_aux": float(window),
            "k": float(cfg.topk.k)}


def check(cfg: SAEConfig) -> None:
    t, n = cfg.topk, cfg.n_features
    if not 0 < t.k <= n:
        raise ConfigError(f"sae.topk.k={t.k} must be in [1, sae.n_features={n}]")
    if not 0 <= t.k_aux <= n:
        raise ConfigError(f"sae.topk.k_aux={t.k_aux} must be in [0, sae.n_features={n}] "
                          "(0 = d_in/2)")


def use_sparse(cfg: SAEConfig) -> bool:
    """Whether the training loss takes the sparse path (`sae.topk.path`)."""
    path = cfg.topk.path
    if path == "auto":
        below = SPARSE_BELOW.get(jax.default_backend(), SPARSE_BELOW["gpu"])
        return cfg.topk.k <= below * cfg.n_features
    return path == "sparse"


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


def keep_top_k(pre: jax.Array, k: int, k_now: jax.Array | None = None) -> jax.Array:
    """Zero all but the k largest entries of each row, then ReLU the kept ones; `k_now` (≤ k,
    may be traced): keep only the first k_now of them."""
    values, idx = topk_sparse.top_k(pre, k, topk_sparse.platform_chunk())
    rows = jnp.arange(pre.shape[0])[:, None]
    return jnp.zeros_like(pre).at[rows, idx].set(within(jax.nn.relu(values), k_now))


def within(values: jax.Array, k_now: jax.Array | None) -> jax.Array:
    """values [B, k] of ranks 0..k-1 with ranks ≥ k_now zeroed (a sweep member's k below the
    k the step was compiled for); unchanged for k_now None."""
    if k_now is None:
        return values
    keep = jnp.arange(values.shape[-1]) < k_now
    return jnp.where(keep, values, jnp.zeros_like(values))


class TopKSAE(SAE):
    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, enc_from_dec=True)
        self.k, self.k_aux = cfg.topk.k, k_aux(cfg)
        self.sparse = use_sparse(cfg)

    def encode(self, x: jax.Array) -> jax.Array:
        return keep_top_k(self.pre_activations(x), self.k)

    @staticmethod
    def k_now(ctx: LossContext) -> jax.Array | None:
        """The k of this step's member (`hparams`), at most the compiled `self.k`."""
        return jnp.round(ctx.hparams["k"]).astype(jnp.int32) if "k" in ctx.hparams else None

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        if self.sparse:
            return self.sparse_loss(x, ctx)
        pre = self.pre_activations(x)
        f = keep_top_k(pre, self.k, self.k_now(ctx))
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
            e_hat = precision.matmul(keep_top_k(masked, self.k_aux), self.W_dec[...],
                                     self.dtype, jnp.float32)
            return jnp.square(e_hat - jax.lax.stop_gradient(residual)).mean()

        # A cond, not a where: steps with no dead latent (all steps of the first dead window, and
        # runs where none die) skip the k_aux top-k, its scatter, a dense [B,F]@[F,d] product
        # and their gradients.
        return batching.cond(dead.any(), aux, lambda *_: jnp.zeros((), jnp.float32),
                            pre, residual)

    def sparse_loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        """`loss` on the sparse path: the same values and gradients, no [B,F] array kept."""
        dead = self.dead(ctx, x.shape[0])
        ks, masks = ((self.k,), (None,)) if dead is None else ((self.k, self.k_aux), (None, dead))
        selected = topk_sparse.select(x, self.b_dec[...], self.W_enc[...], self.b_enc[...],
                                      ks, masks, self.dtype)
        values, idx = selected[0]
        z = within(jax.nn.relu(values), self.k_now(ctx))
        x_hat = topk_sparse.decode(z, idx, self.W_dec[...]) + self.b_dec[...]
        fired = z > 0  # [B,k]: its row sums are the L0, as a [B,F] mask's
        metrics = reconstruction_metrics(x, x_hat, fired)
        aux = (jnp.zeros(()) if dead is None else
               self.sparse_aux_loss(selected[1], x - jax.lax.stop_gradient(x_hat), dead))
        loss = metrics["mse"] + ctx.hparams["aux_coefficient"] * aux
        return loss, {**metrics, "aux_loss": aux, "loss": loss,
                      "fired": topk_sparse.fire_counts(idx, fired, self.W_dec.shape[0])}

    def sparse_aux_loss(self, selected: tuple[jax.Array, jax.Array], residual: jax.Array,
                        dead: jax.Array) -> jax.Array:
        """`aux_loss` from the top k_aux dead latents' (values, indices) (0 if none is dead)."""
        def aux(values, idx, residual):
            e_hat = topk_sparse.decode(jax.nn.relu(values), idx, self.W_dec[...])
            return jnp.square(e_hat - jax.lax.stop_gradient(residual)).mean()

        return batching.cond(dead.any(), aux, lambda *_: jnp.zeros((), jnp.float32),
                            *selected, residual)
