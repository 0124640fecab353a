"""Dead-feature resampling, the procedure of Towards Monosemanticity, streamed over its inputs.

At configured steps, features that have not fired in any of the previous `window` steps are
dead. The current model's loss is computed on a random subset of inputs; for each dead feature
an input is sampled with probability ∝ loss², and (the family's rule, `Family.resample`; for
the ReLU SAE)
  - decoder row   <- that input at unit norm,
  - encoder row   <- that input at unit norm × enc_scale × mean encoder-row norm of alive features,
  - encoder bias  <- 0,
  - Adam moments of every modified entry <- 0.

The inputs arrive in chunks and are never held together: each chunk's losses [c] are computed
([c, F] at most at a time) and every feature keeps one drawn input [d], replaced by a draw from
the new chunk (∝ loss² within it) with probability (the chunk's Σloss²) / (Σloss² so far). That
is an exact sample ∝ loss² over all inputs, in memory that does not grow with `n_inputs`. When no
feature is dead nothing is sampled at all. Fixed shapes throughout (every feature draws; `where`
keeps alive ones), so each piece compiles once and runs under any sharding.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from saejax.config import Config
from saejax.sae import get_family
from saejax.sharding import to_host
from saejax.train.state import TrainState, loss_context, steps_since_fired

CHUNK = 8192
"""Inputs per chunk: bounds the [chunk, F] activations of the loss computation."""


@struct.dataclass
class Draws:
    """Each feature's draw so far, ∝ loss² and (for an all-zero loss) uniformly."""

    weighted: jax.Array
    """[F, d] the (scaled) input each feature drew ∝ loss²."""
    uniform: jax.Array
    """[F, d] the input each feature drew uniformly (used only if every loss is 0)."""
    total: jax.Array
    """float32: Σ loss² over the inputs seen."""
    count: jax.Array
    """float32: inputs seen."""
    key: jax.Array
    """PRNG key data of the draws."""
    next_rng: jax.Array
    """The state's RNG after this event."""


def dead_mask(state: TrainState) -> jax.Array:
    """[F] bool: features that have not fired in the resampling window."""
    return steps_since_fired(state) >= state.hparams["resample_window_steps"].astype(jnp.int32)


def begin(state: TrainState) -> Draws:
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
    rows = jnp.zeros_like(state.params["W_dec"])
    zero = jnp.zeros((), jnp.float32)
    return Draws(rows, rows, zero, zero, jax.random.key_data(key), jax.random.key_data(rng))


def draw_chunk(state: TrainState, draws: Draws, inputs: jax.Array, *, graphdef) -> Draws:
    """Fold one chunk of raw inputs [c, d_in] into every feature's draw."""
    x = inputs * state.input_scale
    loss = nnx.merge(graphdef, state.params).per_input_loss(x, loss_context(state))
    w = jnp.square(loss)
    n = dead_mask(state).shape[0]
    key, k1, k2, k3, k4 = jax.random.split(jax.random.wrap_key_data(draws.key), 5)
    chunk_w, chunk_n = w.sum(), jnp.float32(x.shape[0])
    take_w = jax.random.uniform(k1, (n,)) * (draws.total + chunk_w) < chunk_w
    idx_w = jax.random.categorical(k2, jnp.where(w > 0, jnp.log(w), -jnp.inf), shape=(n,))
    take_u = jax.random.uniform(k3, (n,)) * (draws.count + chunk_n) < chunk_n
    idx_u = jax.random.randint(k4, (n,), 0, x.shape[0])
    return draws.replace(
        weighted=jnp.where(take_w[:, None], x[idx_w], draws.weighted),
        uniform=jnp.where(take_u[:, None], x[idx_u], draws.uniform),
        total=draws.total + chunk_w, count=draws.count + chunk_n,
        key=jax.random.key_data(key))


def apply(state: TrainState, draws: Draws, *, cfg: Config,
          tx: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
    """Reinitialise the dead features from their draws; returns (state, number resampled)."""
    params, dead = state.params, dead_mask(state)
    chosen = jnp.where(draws.total > 0, draws.weighted, draws.uniform)
    unit = chosen / jnp.maximum(jnp.linalg.norm(chosen, axis=1, keepdims=True), 1e-12)
    enc_norms = jnp.linalg.norm(params["W_enc"], axis=0)
    n_alive = jnp.sum(~dead)
    mean_alive = jnp.where(n_alive > 0, jnp.sum(jnp.where(dead, 0.0, enc_norms)) / n_alive, 1.0)
    new_params, masks = get_family(cfg.sae.arch).resample(
        params, dead, unit, state.hparams["resample_enc_scale"] * mean_alive)
    opt_state = optax.tree_map_params(
        tx, lambda m, mask: jnp.where(mask, jnp.zeros_like(m), m), state.opt_state, masks,
        transform_non_params=lambda v: v,
    )
    new_state = state.replace(
        params=new_params,
        opt_state=opt_state,
        # A resampled feature gets a fresh window before it can count as dead again.
        last_fired=jnp.where(dead, state.step, state.last_fired),
        # Advanced only by an event that resampled: a sweep member with none dead (its event
        # runs because another member's did) stays equal to its solo run.
        rng=jnp.where(dead.any(), draws.next_rng, state.rng),
    )
    return new_state, dead.sum()


def resample(contract, state: TrainState,
             chunks: Iterable[jax.Array]) -> tuple[TrainState, np.ndarray]:
    """One resampling event with the compiled pieces of `contract` (`StepContract`), drawing
    from `chunks` of raw inputs (each [c, d_in], sharded like batches; consumed lazily, and not
    at all when no feature is dead). Returns the new state and the number resampled (per
    member for a sweep group's stacked state)."""
    dead = to_host(contract.dead_count_fn(state))
    if not np.any(dead):
        return state, dead
    draws = contract.resample_begin_fn(state)
    for x in chunks:
        draws = contract.resample_chunk_fn(state, draws, x)
    state, n = contract.resample_apply_fn(state, draws)
    return state, to_host(n)
