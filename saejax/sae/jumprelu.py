"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Lieberum et al. 2024, Gemma Scope).

    z = W_enc x̄ + b_enc          x̄ = x − b_dec (`apply_b_dec_to_input`, the default) or x
    f = JumpReLU_θ(z) = z · H(z − θ),   θ = exp(log_threshold) > 0, one per feature
    x̂ = W_dec f + b_dec
    loss = ‖x − x̂‖² + λ_t · Σ_i H(z_i − θ_i)          (the paper's eq. for L0, mean over the batch)

H has zero derivative, so the paper trains θ through straight-through pseudo-derivatives with the
rectangle kernel K(u) = 1{|u| < ½} of bandwidth ε (its section 4), written here as `custom_vjp`s:

    ð/ðθ JumpReLU_θ(z) = −(θ/ε) · K((z − θ)/ε)          ð/ðz JumpReLU_θ(z) = H(z − θ)
    ð/ðθ H(z − θ)      = −(1/ε) · K((z − θ)/ε)          ð/ðz H(z − θ)      = 0

so the L0 term moves only θ (never W_enc or b_enc), and the reconstruction reaches the encoder
through the features that fire. The gradient wrt log θ is θ times that wrt θ (autodiff).

Units. The paper normalises inputs to unit mean squared norm and sums the squared error over
dimensions; saejax normalises to E‖x‖² = d_in (`LossContext.scale_to_norm`) and its "mse" is the
mean over elements. Those are the same number: ‖x_s − x̂_s‖²/d_in = ‖x_p − x̂_p‖² with
x_s = √d_in·x_p. So the loss above is mse + λ·L0 with the paper's λ unchanged, and the config's
θ₀ and ε, given in the paper's units (Gemma Scope: 0.001 and 0.001), are multiplied by √d_in
(pre-activations, hence θ and ε, scale like x with the unit-norm decoder). On unscaled inputs
(`sae.scale_inputs=false`, x = x_s/s) the loss is divided by s², so λ/s² and ε·√d_in/s apply;
θ₀ is then taken as if the inputs were normalised (it is learned, from there).

Decoder rows are kept at unit norm (the base class's rule), as Gemma Scope does (renormalised after
each step, the parallel gradient removed first); the L0 penalty does not see decoder norms, so an
unconstrained decoder would let W_enc, b_enc, θ shrink against ε. W_enc starts as W_decᵀ, b_enc
at 0 (Gemma Scope); b_dec at the geometric median unless `sae.init_b_dec_median=false`. The paper
uses Adam with β1 = 0 (`optim.b1=0`), λ warmed up linearly (here over `l0_warmup_fraction` of the
run, relu.py's ramp) and no resampling (none here: `Family.resample` is None).

Where the references differ from the paper (saejax follows the paper unless said):
* Pre-encoder bias: the paper and Gemma Scope encode x, not x − b_dec; SAELens's training default
  (`apply_b_dec_to_input=True`) and every other saejax family subtract b_dec, and so does this
  family by default (BatchTopK/Matryoshka are evaluated as this JumpReLU with it). The two are
  the same function class (b_enc absorbs −W_enc b_dec); only b_dec's gradient differs.
  `apply_b_dec_to_input=false` is the paper's form, and Gemma Scope folders load as it.
* SAELens (`JumpReLUTrainingSAE`) trains θ itself, clamped at 0, not log θ (its gradient wrt
  θ is saejax's wrt log θ divided by θ); its defaults are θ₀ = 0.01, ε = 0.05 on unnormalised
  inputs, its decoder starts at norm 0.1 and is not constrained. Its "step" L0 uses the paper's
  estimator on the pre-activations, as here, and its loss is the paper's (summed squared error).
* The paper's pseudo-code applies a ReLU before the JumpReLU; with θ > 0 the forward pass is
  the same, and saejax follows the equations (the kernel is evaluated at z, not at ReLU(z)).
* With `target_l0` > 0 (not in the paper), λ is adapted after the warm-up until the batch L0
  reaches the target: relu.py's controller at a tenth of its rate (`TARGET_GAIN`), so a first
  run gets a useful L0 without a λ sweep.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saejax.sae import precision, relu
from saejax.sae.base import SAE, LossContext
from saejax.sae.config import SAEConfig
from saejax.sae.stats import reconstruction_metrics


# ------------------------------------------------------------------ straight-through estimators


def _rectangle(u: jax.Array) -> jax.Array:
    """K(u) = 1{−½ < u < ½}."""
    return (jnp.abs(u) < 0.5).astype(jnp.float32)


def _kernel(z: jax.Array, theta: jax.Array, eps: jax.Array) -> jax.Array:
    """(1/ε)·K((z − θ)/ε), float32 [..., F]."""
    return _rectangle((z.astype(jnp.float32) - theta) / eps) / eps


def _sum_to(t: jax.Array, like: jax.Array) -> jax.Array:
    """t summed over its leading (batch) axes to `like`'s shape, in float32."""
    return t.sum(axis=tuple(range(t.ndim - like.ndim)), dtype=jnp.float32).astype(like.dtype)


@jax.custom_vjp
def jumprelu(z: jax.Array, theta: jax.Array, eps: jax.Array) -> jax.Array:
    """z · H(z − θ) for z [..., F], θ [F]; bandwidth ε (a scalar) only shapes the gradient."""
    return jnp.where(z > theta, z, 0).astype(z.dtype)


def _jumprelu_fwd(z, theta, eps):
    return jumprelu(z, theta, eps), (z, theta, eps)


def _jumprelu_bwd(res, g):
    z, theta, eps = res
    dz = jnp.where(z > theta, g, 0).astype(z.dtype)
    dtheta = _sum_to(-(theta * _kernel(z, theta, eps)) * g, theta)
    return dz, dtheta, jnp.zeros_like(eps)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step(z: jax.Array, theta: jax.Array, eps: jax.Array) -> jax.Array:
    """H(z − θ) as float32 [..., F] (summed over features: the L0)."""
    return (z > theta).astype(jnp.float32)


def _step_fwd(z, theta, eps):
    return step(z, theta, eps), (z, theta, eps)


def _step_bwd(res, g):
    z, theta, eps = res
    return jnp.zeros_like(z), _sum_to(-_kernel(z, theta, eps) * g, theta), jnp.zeros_like(eps)


step.defvjp(_step_fwd, _step_bwd)


# ------------------------------------------------------------------ the family's record pieces


DATA_FIELDS = ("jumprelu.l0_coefficient", "jumprelu.l0_warmup_fraction", "jumprelu.target_l0",
               "jumprelu.bandwidth", "jumprelu.threshold_init")
"""`Family.data_fields`: λ, its warm-up and target and ε are `hparams`; θ₀ only initialises."""


def hparams(cfg: SAEConfig, steps: int, batch_size: int) -> dict[str, float]:
    j = cfg.jumprelu
    return {"l0_coefficient": j.l0_coefficient, "target_l0": j.target_l0,
            "l0_warmup_steps": float(round(j.l0_warmup_fraction * steps)),
            "bandwidth": j.bandwidth}


def init_state(cfg: SAEConfig) -> dict[str, jax.Array]:
    """log of the factor the L0 target has applied to λ (0 without a target)."""
    return {"log_l0_factor": jnp.zeros((), jnp.float32)}


def check(cfg: SAEConfig) -> None:
    relu.check_l0_target(cfg, "jumprelu", "l0_coefficient")


def saelens_options(cfg: SAEConfig) -> dict:
    return {"apply_b_dec_to_input": cfg.jumprelu.apply_b_dec_to_input}


def from_saelens(cfg_json: dict) -> dict:
    """SAELens's JumpReLU encodes x − b_dec or x as its cfg says (Gemma Scope: x)."""
    return {"jumprelu": {"apply_b_dec_to_input": bool(cfg_json.get("apply_b_dec_to_input",
                                                                    True))}}


def to_saelens(params: dict) -> dict:
    """SAELens stores θ itself ("threshold")."""
    out = {k: v for k, v in params.items() if k != "log_threshold"}
    return {**out, "threshold": np.exp(np.asarray(params["log_threshold"]))}


def from_saelens_tensors(tensors: dict) -> dict:
    """log θ from SAELens's θ. SAELens encodes ReLU(z)·H(z − θ), which for θ ≤ 0 is ReLU(z):
    θ = 0 exactly, so θ is clamped at 0 (log θ = −inf, exp gives back 0)."""
    if "threshold" not in tensors:  # an older SAELens checkpoint already holds log θ
        return tensors
    out = {k: v for k, v in tensors.items() if k != "threshold"}
    with np.errstate(divide="ignore"):
        log_threshold = np.log(np.maximum(tensors["threshold"], 0))
    return {**out, "log_threshold": log_threshold.astype(np.float32)}


def _relu_view(ctx: LossContext) -> LossContext:
    """ctx as relu.py's λ ramp and L0 controller read it (they name λ and its factor "l1")."""
    h = ctx.hparams
    return dataclasses.replace(
        ctx, hparams={"l1_coefficient": h["l0_coefficient"], "target_l0": h["target_l0"],
                      "l1_warmup_steps": h["l0_warmup_steps"]},
        state={"log_l1_factor": ctx.state["log_l0_factor"]})


TARGET_GAIN = 0.1
"""With `target_l0`, relu.py's controller runs at this fraction of its rate: θ follows λ through
Adam steps on log θ, hundreds of steps behind, and at relu's rate λ overshoots by orders of
magnitude (it swung between 1e-4 and 0.14 on the synthetic default)."""


def next_l0_factor(ctx: LossContext, l0: jax.Array) -> jax.Array:
    """relu.py's L0 controller at TARGET_GAIN of its rate: it is handed the L0 whose error
    log((L0 + 0.1)/target) is TARGET_GAIN × the true one."""
    target = jnp.maximum(ctx.hparams["target_l0"], 1e-6)
    damped = target * ((l0 + 0.1) / target) ** TARGET_GAIN - 0.1
    return relu.next_l1_factor(_relu_view(ctx), damped)


def l0_coefficient(ctx: LossContext) -> jax.Array:
    """λ_t in the units of the SAE's inputs: relu.py's warm-up ramp and L0-target factor, and
    λ/s² on unscaled inputs (relu's λ/s is for an L1 term, which scales like x; L0 does not)."""
    return relu.l1_coefficient(_relu_view(ctx)) / ctx.scale_to_norm


class JumpReLUSAE(SAE):
    AXES = {**SAE.AXES, "log_threshold": ("d_sae",)}

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, enc_from_dec=True)
        j = cfg.jumprelu
        self.apply_b_dec_to_input = j.apply_b_dec_to_input
        theta0 = j.threshold_init * math.sqrt(cfg.d_in)  # paper units -> E‖x‖² = d_in
        self.log_threshold = self.param(
            "log_threshold", jnp.full((cfg.n_features,), math.log(theta0), jnp.float32))

    def pre_activations(self, x: jax.Array) -> jax.Array:
        if self.apply_b_dec_to_input:
            return super().pre_activations(x)
        return precision.dense(x, self.W_enc[...], self.b_enc[...], self.dtype)

    def threshold(self) -> jax.Array:
        return jnp.exp(self.log_threshold[...])

    def encode(self, x: jax.Array) -> jax.Array:
        z = self.pre_activations(x)
        return jnp.where(z > self.threshold(), z, 0).astype(z.dtype)

    def bandwidth(self, ctx: LossContext) -> jax.Array:
        """ε in the units of the SAE's inputs (the config's is in the paper's)."""
        return ctx.hparams["bandwidth"] * math.sqrt(self.cfg.d_in) / ctx.scale_to_norm

    def _forward(self, x: jax.Array, ctx: LossContext):
        """(f, x̂, [B] L0 through the estimator, λ_t)."""
        z, theta, eps = self.pre_activations(x), self.threshold(), self.bandwidth(ctx)
        f = jumprelu(z, theta, eps)
        return f, self.decode(f), step(z, theta, eps).sum(axis=-1), l0_coefficient(ctx)

    def loss(self, x: jax.Array, ctx: LossContext) -> tuple[jax.Array, dict]:
        f, x_hat, l0, lam = self._forward(x, ctx)
        metrics = reconstruction_metrics(x, x_hat, self.fired(f))
        sparsity = lam * l0.mean()
        loss = metrics["mse"] + sparsity
        state = {"log_l0_factor": next_l0_factor(ctx, metrics["l0"])}
        return loss, {**metrics, "sparsity_loss": sparsity, "loss": loss,
                      "l0_coefficient": lam * jnp.square(ctx.scale_to_norm),
                      "threshold_mean": (jnp.mean(self.threshold()) * ctx.scale_to_norm
                                         / math.sqrt(self.cfg.d_in)),  # paper units
                      "fired": self.fire_counts(f), "state": state}

    def per_input_loss(self, x: jax.Array, ctx: LossContext) -> jax.Array:
        f, x_hat, l0, lam = self._forward(x, ctx)
        return jnp.square(x_hat - x).mean(axis=-1) + lam * l0
