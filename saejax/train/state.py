"""Everything a run carries across steps (`TrainState`), how it starts, and its shardings.

Parameters and their optimizer moments follow the logical-axis rules table; the per-feature
records (last step fired, firings in the logging window) are sharded over features like them.
Hyperparameters that leave shapes alone (peak LR, Adam's β1/β2/ε, the clipping norm, λ and its
warm-up, the AuxK weight and window, the resampling window and scale) are arrays in the state,
not constants compiled into the step: one compiled step serves many settings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from saejax import sharding
from saejax.config import Config
from saejax.sae import LossContext, get_family
from saejax.sae.init import geometric_median, input_scale
from saejax.train.schedule import lr_schedule


@struct.dataclass
class TrainState:
    step: jax.Array
    """int32 scalar: number of optimizer steps completed."""
    params: dict
    """SAE parameters, a plain dict (names and axes: the family's `param_axes`)."""
    opt_state: Any
    """optax state of `params` (Adam's β1, β2, ε and the clipping norm are arrays in it)."""
    hparams: dict
    """float32 scalars: "lr" (peak), resampling's and the family's (`Family.hparams`)."""
    family_state: dict
    """The family's non-parameter state (`Family.init_state`; empty for most families)."""
    last_fired: jax.Array
    """int32 [F]: value of `step` after the last step in which each feature fired (0 = never)."""
    fire_count: jax.Array
    """int32 [F]: tokens on which each feature fired in the current logging window."""
    input_scale: jax.Array
    """float32 scalar: inputs are multiplied by this before the SAE (1 unless sae.scale_inputs)."""
    norm_scale: jax.Array
    """float32 scalar s with E||s·x||² = d_in on a data sample: the units penalties are defined
    in, whether or not the inputs are scaled (then input_scale = s)."""
    rng: jax.Array
    """uint32 [2]: PRNG key for resampling, advanced on use."""
    nonfinite_step: jax.Array
    """int32 scalar: first step whose loss was NaN/Inf, or -1."""


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Adam (optionally after global-norm clipping) with its scalars injected as state arrays.
    The learning rate in the state is set by the step from `lr_at` (peak × schedule)."""
    o = cfg.optim
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=o.lr, b1=o.b1, b2=o.b2, eps=o.eps)
    if not o.grad_clip:
        return adam
    return optax.chain(optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=o.grad_clip),
                       adam)


def lr_at(cfg: Config, peak: jax.Array, step: jax.Array) -> jax.Array:
    """Learning rate of step `step` (0-based): peak × the schedule's shape (warm-up, decay)."""
    o = cfg.optim
    return peak * lr_schedule(1.0, o.warmup_steps, o.decay, cfg.train.steps)(step)


def hparams(cfg: Config) -> dict[str, jax.Array]:
    """The hyperparameters carried as data (see the module docstring)."""
    t = cfg.train
    values = {"lr": cfg.optim.lr, "resample_window_steps": float(resample_window(cfg)),
              "resample_enc_scale": cfg.resample.enc_scale,
              **get_family(cfg.sae.arch).hparams(cfg.sae, t.steps, t.batch_size)}
    return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


def resample_window(cfg: Config) -> int:
    """Steps without firing that make a feature dead for resampling (0 = an eighth of the run:
    half the spacing of resampling at 25/50/75%, the paper's proportion)."""
    return cfg.resample.window_steps or max(1, cfg.train.steps // 8)


def loss_context(state: "TrainState") -> LossContext:
    """What the family's loss needs besides parameters and data, from the state."""
    return LossContext(state.step, state.hparams, steps_since_fired(state), state.family_state,
                       scale_to_norm=state.norm_scale / state.input_scale)


def steps_since_fired(state: TrainState) -> jax.Array:
    """int32 [F]: steps since each feature last fired (a feature is dead for a window of w steps
    when this is >= w)."""
    return state.step - state.last_fired


def init_state(cfg: Config, tx: optax.GradientTransformation, sample: jax.Array | None) -> TrainState:
    s = cfg.sae
    family = get_family(s.arch)
    params = nnx.to_pure_dict(nnx.split(family.make(s, seed=cfg.train.seed))[1])
    norm = scale = jnp.ones((), jnp.float32)
    if sample is not None:
        norm = input_scale(sample)
        if s.scale_inputs:
            scale = norm
        if s.init_b_dec_median:
            params["b_dec"] = geometric_median(sample * scale)
    n = s.n_features
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        hparams=hparams(cfg),
        family_state=family.init_state(s),
        last_fired=jnp.zeros((n,), jnp.int32),
        fire_count=jnp.zeros((n,), jnp.int32),
        input_scale=scale,
        norm_scale=norm,
        rng=jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def param_shardings(cfg: Config, mesh: Mesh) -> dict:
    """Each parameter's sharding, from the family's logical axes and the rules table."""
    return {k: sharding.named(mesh, axes)
            for k, axes in get_family(cfg.sae.arch).param_axes.items()}


def state_shardings(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    """Parameters and their optimizer moments follow the rules table; the rest is replicated,
    except the per-feature records, which are sharded over features like the parameters."""
    family = get_family(cfg.sae.arch)
    abstract = jax.eval_shape(lambda: init_state(cfg, tx, None))
    param_sh = param_shardings(cfg, mesh)
    rep = sharding.replicated(mesh)
    opt_sh = sharding.optimizer_shardings(tx, abstract.opt_state, param_sh, mesh)
    feat = sharding.named(mesh, ("d_sae",))
    return TrainState(
        step=rep, params=param_sh, opt_state=opt_sh,
        hparams=jax.tree.map(lambda _: rep, abstract.hparams),
        family_state={k: sharding.named(mesh, family.state_axes.get(k))
                      for k in abstract.family_state},
        last_fired=feat, fire_count=feat, input_scale=rep, norm_scale=rep, rng=rep,
        nonfinite_step=rep,
    )
