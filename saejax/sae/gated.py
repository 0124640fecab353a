"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders").

    x̄ = x − b_dec
    π_gate = W_gate x̄ + b_gate          π_mag = W_mag x̄ + b_mag,   W_mag = exp(r_mag) ⊙ W_gate
    f = 1[π_gate > 0] ⊙ ReLU(π_mag);    x̂ = W_dec f + b_dec
    loss = ‖x − x̂‖² + λ_t · Σ_i ReLU(π_gate)_i · ‖W_dec,i‖ + ‖x − x̂_frozen(ReLU(π_gate))‖²

x̂_frozen is the decoder with W_dec and b_dec under stop_gradient (the paper's frozen copy): the
auxiliary term trains the gate path to reconstruct, not the decoder. The Heaviside gate has no
gradient; the reconstruction trains the magnitude path (W_gate through W_mag, r_mag, b_mag) and
the decoder, the L1 and auxiliary terms the gate path. Parameters carry SAELens's names:
W_enc is W_gate, and there is no b_enc.

Decoder rows are kept at unit norm (the base class's rule, as in the paper). The L1 term is
weighted by each feature's decoder-row norm, as SAELens writes it: on the unit-norm decoder the
weight is 1 and its gradient is parallel to the row, which the step removes, so the training is
the paper's unweighted L1 exactly. W_gate starts as W_decᵀ (SAELens; W_mag = W_gate, r_mag = 0),
the biases at 0, b_dec at the geometric median unless `sae.init_b_dec_median=false`. Dead
features are resampled by Towards Monosemanticity's rule adapted to the gated parameters
(`resample`), saejax's remedy for its L1-penalty families, as for the ReLU SAE.

Units: λ is the paper's, for inputs at unit mean squared norm with squared errors summed over
dimensions. saejax's inputs have mean squared norm d_in and its squared errors are means over
elements (the same numbers), while ReLU(π_gate) scales like x, so λ/√d_in is applied (and a
further 1/s on unscaled inputs, x = x_s/s, as relu.py's λ). With `target_l0` > 0 (not in the
paper) λ is adapted after its warm-up until the batch L0 reaches the target (relu.py's controller).

Where SAELens (`GatedTrainingSAE`) differs from the paper: its auxiliary reconstruction goes
through the live decoder, so W_dec and b_dec also get that term's gradient; saejax freezes them
as the paper does. Its MSE and auxiliary terms sum over d_in, like the paper's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.sae import precision, relu
from saejax.sae.base import SAE, LossContext, random_directions
from saejax.sae.config import SAEConfig
from saejax.sae.decoder_norm import row_norms
from saejax.sae.family import resample_standard
from saejax.sae.stats import reconstruction_metrics

PER_FEATURE = ("b_gate", "r_mag", "b_mag")
"""The gated family's per-feature vectors (b_enc's place)."""


DATA_FIELDS = ("gated.l1_coefficient", "gated.l1_warmup_fraction", "gated.target_l0")
"""`Family.data_fields`: λ, its warm-up and target are `hparams`."""


def hparams(cfg: SAEConfig, steps: int, batch_size: int) -> dict[str, float]:
    """relu.py's names, so its λ ramp and L0 controller read them as they are."""
    g = cfg.gated
    return {"l1_coefficient": g.l1_coefficient, "target_l0": g.target_l0,
            "l1_warmup_steps": float(round(g.l1_warmup_fraction * steps))}


def check(cfg: SAEConfig) -> None:
    relu.check_l0_target(cfg, "gated", "l1_coefficient")


def from_saelens(cfg_json: dict) -> dict:
    """No options; a SAELens gated SAE that does not subtract b_dec is another function."""
    if not cfg_json.get("apply_b_dec_to_input", True):
        raise ValueError("apply_b_dec_to_input=false is not supported for architecture 'gated'")
    return {}


def resample(params: dict, dead: jax.Array, unit: jax.Array,
             enc_norm: jax.Array) -> tuple[dict, dict]:
    """`resample_standard` for W_enc (W_gate) and W_dec; a dead feature's b_gate, b_mag and r_mag
    <- 0 (so its W_mag row is its new W_gate row)."""
    new, masks = resample_standard({**params, "b_enc": jnp.zeros_like(params["b_gate"])},
                                   dead, unit, enc_norm)
    del new["b_enc"], masks["b_enc"]
    new.update({k: jnp.where(dead, 0.0, params[k]) for k in PER_FEATURE})
    masks.update({k: dead for k in PER_FEATURE})
    return new, masks


def l1_coefficient(ctx: LossContext, d_in: int) -> jax.Array:
    """λ_t in the units of the SAE's inputs (module docstring)."""
    return relu.l1_coefficient(ctx) / math.sqrt(d_in)


class GatedSAE(SAE):
    AXES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",),
            **{name: ("d_sae",) for name in PER_FEATURE}}

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        # Not SAE.__init__: the gated family has no b_enc.
        d, n = cfg.d_in, cfg.n_features
        w_dec = random_directions(rngs.params(), n, d)
        self.W_enc = self.param("W_enc", w_dec.T)
        self.W_dec = self.param("W_dec", w_dec)
        self.b_dec = self.param("b_dec", jnp.zeros((d,), jnp.float32))
        for name in PER_FEATURE:
            setattr(self, name, self.param(name, jnp.zeros((n,), jnp.float32)))
        self.cfg = cfg

    def paths(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(π_gate, π_mag) [B, F]: one product W_gate x̄, shared by both paths."""
        b_dec, w = self.b_dec[...], self.W_enc[...]
        held = jax.lax.stop_gradient(b_dec)
        # x̄ @ W written as (x − held) @ W − (b_dec − held) @ W: the same value, but b_dec's
        # gradient is a [d]@[d,F] product, not a [B,F]@[F,d] one (see SAE.pre_activations).
        u = precision.dense(x - held, w, -((b_dec - held) @ w), self.dtype)
        scale = jnp.exp(self.r_mag[...]).astype(u.dtype)
        return u + self.b_gate[...].astype(u.dtype), u * scale + self.b_mag[...].astype(u.dtype)

    def encode(self, x: jax.Array) -> jax.Array:
        pi_gate, pi_mag = self.paths(x)
        return jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0).astype(pi_mag.dtype)

    def _terms(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(f, x̂, [B] decoder-norm-weighted L1 of the gate, [B] auxiliary squared error)."""
        pi_gate, pi_mag = self.paths(x)
        f = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0).astype(pi_mag.dtype)
        gate = jax.nn.relu(pi_gate)
        w_dec = self.W_dec[...]
        l1 = jnp.sum(gate * row_norms(w_dec), axis=-1, dtype=jnp.float32)
        frozen = precision.dense(gate, jax.lax.stop_gradient(w_dec),
                                 jax.lax.stop_gradient(self.b_dec[...]), self.dtype, jnp.float32)
        return f, self.decode(f), l1, jnp.square(frozen - x).mean(axis=-1)

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        f, x_hat, l1, aux = self._terms(x)
        metrics = reconstruction_metrics(x, x_hat, self.fired(f))
        lam = l1_coefficient(ctx, self.cfg.d_in)
        loss = metrics["mse"] + lam * l1.mean() + aux.mean()
        state = {"log_l1_factor": relu.next_l1_factor(ctx, metrics["l0"])}
        return loss, {**metrics, "l1": l1.mean(), "aux_loss": aux.mean(), "loss": loss,
                      "l1_coefficient": lam * math.sqrt(self.cfg.d_in) * ctx.scale_to_norm,
                      "fired": self.fire_counts(f), "state": state}

    def per_input_loss(self, x: jax.Array, ctx: LossContext) -> jax.Array:
        f, x_hat, l1, aux = self._terms(x)
        return (jnp.square(x_hat - x).mean(axis=-1) + l1_coefficient(ctx, self.cfg.d_in) * l1
                + aux)
