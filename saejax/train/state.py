"""Everything a run carries across steps (`TrainState`), how it starts, and its shardings.

Parameters and their optimizer moments follow the logical-axis rules table; the per-feature
records (last step fired, firings in the logging window) are sharded over features like them.
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
from saejax.sae import AXES, make_sae
from saejax.sae.init import geometric_median, input_scale


@struct.dataclass
class TrainState:
    step: jax.Array
    """int32 scalar: number of optimizer steps completed."""
    params: dict
    """SAE parameters, a plain dict (see saejax.sae.base.AXES)."""
    opt_state: Any
    """optax state of `params`."""
    last_fired: jax.Array
    """int32 [F]: value of `step` after the last step in which each feature fired (0 = never)."""
    fire_count: jax.Array
    """int32 [F]: tokens on which each feature fired in the current logging window."""
    input_scale: jax.Array
    """float32 scalar: inputs are multiplied by this before the SAE (1 unless sae.scale_inputs)."""
    rng: jax.Array
    """uint32 [2]: PRNG key for resampling, advanced on use."""
    nonfinite_step: jax.Array
    """int32 scalar: first step whose loss was NaN/Inf, or -1."""


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    o, steps = cfg.optim, cfg.train.steps
    decay_steps = max(steps - o.warmup_steps, 1)
    after = {
        "constant": optax.constant_schedule(o.lr),
        "linear": optax.linear_schedule(o.lr, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(o.lr, decay_steps),
    }[o.decay]
    lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), after],
                              [o.warmup_steps]) if o.warmup_steps else after
    adam = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam) if o.grad_clip else adam


def l1_coefficient(cfg: Config, step: jax.Array) -> jax.Array:
    """λ at `step`, with the optional linear warm-up."""
    lam, warm = cfg.sae.l1_coefficient, cfg.sae.l1_warmup_steps
    if not warm:
        return jnp.asarray(lam, jnp.float32)
    return lam * jnp.minimum(1.0, (step.astype(jnp.float32) + 1) / warm)


def dead_mask(state: TrainState, window_steps: int) -> jax.Array:
    """[F] bool: features that have not fired in the last `window_steps` steps."""
    return state.step - state.last_fired >= window_steps


def aux_dead_window_steps(cfg: Config) -> int:
    return -(-cfg.sae.dead_tokens_aux // cfg.train.batch_size)


def init_state(cfg: Config, tx: optax.GradientTransformation, sample: jax.Array | None) -> TrainState:
    s = cfg.sae
    _, params = nnx.split(make_sae(s, seed=cfg.train.seed))
    params = nnx.to_pure_dict(params)
    scale = jnp.ones((), jnp.float32)
    if sample is not None:
        if s.scale_inputs:
            scale = input_scale(sample)
        if s.init_b_dec_median:
            params["b_dec"] = geometric_median(sample * scale)
    n = s.n_features
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        last_fired=jnp.zeros((n,), jnp.int32),
        fire_count=jnp.zeros((n,), jnp.int32),
        input_scale=scale,
        rng=jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def state_shardings(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    """Parameters and their optimizer moments follow the rules table; the rest is replicated,
    except the per-feature records, which are sharded over features like the parameters."""
    abstract = jax.eval_shape(lambda: init_state(cfg, tx, None))
    param_sh = {k: sharding.named(mesh, AXES[k]) for k in abstract.params}
    rep = sharding.replicated(mesh)
    # eval_shape(opt.init) carries no shardings: map them from the params onto the moments.
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract.opt_state, param_sh,
        transform_non_params=lambda _: rep,
    )
    feat = sharding.named(mesh, ("d_sae",))
    return TrainState(
        step=rep, params=param_sh, opt_state=opt_sh, last_fired=feat, fire_count=feat,
        input_scale=rep, rng=rep, nonfinite_step=rep,
    )
