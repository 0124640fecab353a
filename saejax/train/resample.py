"""Dead-feature resampling, the procedure of Towards Monosemanticity.

At configured steps, features that have not fired in any of the previous `window_steps` steps
are dead. The current model's loss is computed on a random subset of inputs; for each dead
feature an input is sampled with probability ∝ loss², and
  - decoder row   <- that input at unit norm,
  - encoder row   <- that input at unit norm × enc_scale × mean encoder-row norm of alive features,
  - encoder bias  <- 0,
  - Adam moments of every modified entry <- 0.
Fixed shapes throughout (every feature draws a candidate; `where(dead, new, old)` keeps alive
ones), so it compiles once and runs under any sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from saejax.config import Config
from saejax.sae import LossContext, get_family
from saejax.train.state import TrainState, steps_since_fired

_CHUNK = 8192  # inputs per chunk when computing the candidate losses (bounds activation memory)


def candidate_losses(sae, x: jax.Array, ctx: LossContext) -> jax.Array:
    """[N] per-input loss, computed in chunks of rows."""
    n = x.shape[0]
    chunk = min(_CHUNK, n)
    if n % chunk:
        return sae.per_input_loss(x, ctx)
    out = jax.lax.map(lambda c: sae.per_input_loss(c, ctx), x.reshape(n // chunk, chunk, -1))
    return out.reshape(n)


def resample(state: TrainState, inputs: jax.Array, *, graphdef, cfg: Config,
             tx: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
    """Resample dead features of `state` using `inputs` [N, d_in] (raw activations); which
    parameters change is the family's rule (`Family.resample`).

    Returns the new state and the number of features resampled.
    """
    hp, params = state.hparams, state.params
    since = steps_since_fired(state)
    dead = since >= hp["resample_window_steps"].astype(jnp.int32)
    x = inputs * state.input_scale
    sae = nnx.merge(graphdef, params)
    ctx = LossContext(state.step, hp, since, state.family_state)
    loss = candidate_losses(sae, x, ctx)

    key, sample_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    # ∝ loss²: log-probabilities 2·log(loss); an all-zero loss falls back to uniform.
    logits = jnp.where(loss.max() > 0, 2 * jnp.log(loss), 0.0)
    idx = jax.random.categorical(sample_key, logits, shape=dead.shape)
    chosen = x[idx]
    unit = chosen / jnp.maximum(jnp.linalg.norm(chosen, axis=1, keepdims=True), 1e-12)

    enc_norms = jnp.linalg.norm(params["W_enc"], axis=0)
    n_alive = jnp.sum(~dead)
    mean_alive = jnp.where(n_alive > 0, jnp.sum(jnp.where(dead, 0.0, enc_norms)) / n_alive, 1.0)
    new_params, masks = get_family(cfg.sae.arch).resample(
        params, dead, unit, hp["resample_enc_scale"] * mean_alive)
    opt_state = optax.tree_map_params(
        tx, lambda m, mask: jnp.where(mask, jnp.zeros_like(m), m), state.opt_state, masks,
        transform_non_params=lambda v: v,
    )
    new_state = state.replace(
        params=new_params,
        opt_state=opt_state,
        # A resampled feature gets a fresh window before it can count as dead again.
        last_fired=jnp.where(dead, state.step, state.last_fired),
        rng=jax.random.key_data(key),
    )
    return new_state, dead.sum()
