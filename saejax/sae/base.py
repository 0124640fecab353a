"""The module interface every SAE family implements, and the parameters most of them share.

An SAE holds W_enc [d_in, F], b_enc [F], W_dec [F, d_in], b_dec [d_in] (SAELens layout: row i
of W_dec is feature i's decoder direction, the paper's "decoder column"). Families differ in
`encode` and `loss`; a family with other parameters declares them in its own `AXES`.

All methods are pure functions of the parameters, so the train step can `nnx.merge` the module
from a plain dict inside `jax.jit` (and under `jax.vmap` over a leading "which SAE" axis).
Per-step scalars (λ, its warm-up, the AuxK weight) arrive as arrays in `LossContext.hparams`, so
one compiled step serves many settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.sae import decoder_norm, precision
from saejax.sae.config import SAEConfig


@dataclass(frozen=True)
class LossContext:
    """Per-step inputs to the loss that are not parameters or data."""

    step: jax.Array | int = 0
    """int32: optimizer steps completed before this one."""
    hparams: dict = field(default_factory=dict)
    """Scalars of `Family.hparams` (e.g. "l1_coefficient"), as arrays."""
    steps_since_fired: jax.Array | None = None
    """int32 [F]: steps since each latent last fired (None: no record, e.g. outside training)."""
    state: dict = field(default_factory=dict)
    """The family's non-parameter state (`Family.init_state`), as carried across steps."""
    scale_to_norm: jax.Array | float = 1.0
    """Multiplies the SAE's inputs into normalised units (E||x||² = d_in): 1 when the inputs
    are scaled (`sae.scale_inputs`), else the norm scale. Penalties are defined there."""


def random_directions(key: jax.Array, n: int, d: int) -> jax.Array:
    """n random unit vectors in d dims, one per row."""
    w = jax.random.normal(key, (n, d), jnp.float32)
    return w / jnp.linalg.norm(w, axis=1, keepdims=True)


class SAE(nnx.Module):
    """Base class: the shared parameters, decoding, firing and decoder-norm handling."""

    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "W_enc": ("d_in", "d_sae"),
        "b_enc": ("d_sae",),
        "W_dec": ("d_sae", "d_in"),
        "b_dec": ("d_in",),
    }
    """Logical axis names of each parameter; saejax.sharding maps them to mesh axes."""
    unit_norm_decoder: bool = True

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs, enc_from_dec: bool):
        d, n = cfg.d_in, cfg.n_features
        w_dec = random_directions(rngs.params(), n, d)
        if enc_from_dec:
            w_enc = w_dec.T
        else:  # Kaiming-uniform, as nn.Linear
            bound = 1.0 / jnp.sqrt(d)
            w_enc = jax.random.uniform(rngs.params(), (d, n), jnp.float32, -bound, bound)
        self.W_enc = self.param("W_enc", w_enc)
        self.b_enc = self.param("b_enc", jnp.zeros((n,), jnp.float32))
        self.W_dec = self.param("W_dec", w_dec)
        self.b_dec = self.param("b_dec", jnp.zeros((d,), jnp.float32))
        self.cfg = cfg

    @property
    def dtype(self) -> jnp.dtype:
        """`sae.compute_dtype`: of the matmul inputs and [B, F] intermediates (pass it to
        `saejax.sae.precision.matmul` / `dense` for products of a family's own)."""
        return precision.compute_dtype(self.cfg)

    def param(self, name: str, value: jax.Array) -> nnx.Param:
        return nnx.Param(value, out_sharding=self.AXES[name], eager_sharding=False)

    def pre_activations(self, x: jax.Array) -> jax.Array:
        """W_enc (x - b_dec) + b_enc: the paper's x̄ = x - b_d, then the encoder.

        The value is bit for bit that of `(x - b_dec) @ W_enc + b_enc`, but b_dec's gradient
        through the encoder goes through the [d]@[d,F] product of the second term. Written the
        plain way, autodiff forms dpre @ W_encᵀ ([B,F]@[F,d]) and then sums it over the batch:
        a sixth full matmul that the step does not need.

        [B, F] in `self.dtype` (the big product under `saejax.sae.precision`'s policy; the [F]
        bias term, a vector-matrix product, in float32).
        """
        b_dec, w_enc = self.b_dec[...], self.W_enc[...]
        held = jax.lax.stop_gradient(b_dec)
        bias = self.b_enc[...] - (b_dec - held) @ w_enc
        return precision.dense(x - held, w_enc, bias, self.dtype)

    def encode(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def decode(self, f: jax.Array) -> jax.Array:
        """x̂ = f W_dec + b_dec, float32 [B, d_in] (codes and W_dec enter the product in
        `self.dtype`)."""
        return precision.dense(f, self.W_dec[...], self.b_dec[...], self.dtype, jnp.float32)

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        """(scalar loss, aux): aux holds the per-step metrics, "fired" (int32 [F]: on how many
        of the batch's inputs each feature fired, e.g. `fire_counts(f)`) and, for a family with
        state, "state" (its next value)."""
        raise NotImplementedError

    def per_input_loss(self, x: jax.Array, ctx: LossContext) -> jax.Array:
        """[B] loss of each input (resampling draws replacements ∝ its square)."""
        raise NotImplementedError

    def fired(self, f: jax.Array) -> jax.Array:
        """[B, F] bool: what counts as a feature firing on a token (a nonzero activation)."""
        return f > 0

    def fire_counts(self, f: jax.Array) -> jax.Array:
        """int32 [F]: inputs of the batch f [B, F] on which each feature fired."""
        return self.fired(f).sum(axis=0, dtype=jnp.int32)

    # Decoder-norm handling, applied by the train step around the optimizer update.
    def prepare_grads(self, params: dict, grads: dict) -> dict:
        if not self.unit_norm_decoder:
            return grads
        return {**grads, "W_dec": decoder_norm.remove_parallel(grads["W_dec"], params["W_dec"])}

    def constrain(self, params: dict) -> dict:
        if not self.unit_norm_decoder:
            return params
        return {**params, "W_dec": decoder_norm.unit_rows(params["W_dec"])}
