"""The one train step and its sharding contract.

`train_step(state, batch) -> (state, metrics)` is a pure function; `StepContract` is the one
place that declares the shardings of the compiled functions' inputs and outputs and what they
donate, and builds the state already sharded (`jax.jit(init, out_shardings=...)`). Everything the
step needs across steps lives in `TrainState` on device, so ordinary steps never sync the host.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from saejax import sharding
from saejax.config import Config
from saejax.sae import SAE, get_family
from saejax.train import resample as resample_lib
from saejax.train.state import (TrainState, init_state, loss_context, lr_at, make_optimizer,
                                state_shardings)


def train_step(state: TrainState, batch: jax.Array, *, graphdef, cfg: Config,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch [B, d_in] of raw activations."""
    x = batch * state.input_scale
    ctx = loss_context(state)

    def loss_fn(params):
        return nnx.merge(graphdef, params).loss(x, ctx)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    sae: SAE = nnx.merge(graphdef, state.params)
    grads = sae.prepare_grads(state.params, grads)
    lr = lr_at(cfg, state.hparams["lr"], state.step)
    opt_state = optax.tree.set(state.opt_state, learning_rate=lr)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = sae.constrain(optax.apply_updates(state.params, updates))

    step = state.step + 1
    fired = aux.pop("fired")
    window_start = state.step % cfg.train.log_every == 0
    bad = (state.nonfinite_step < 0) & ~jnp.isfinite(loss)
    new_state = state.replace(
        step=step,
        params=params,
        opt_state=opt_state,
        family_state=aux.pop("state", state.family_state),
        last_fired=jnp.where(fired > 0, step, state.last_fired),
        fire_count=jnp.where(window_start, 0, state.fire_count) + fired,
        nonfinite_step=jnp.where(bad, state.step, state.nonfinite_step),
    )
    # Read back on log steps only; the norms cost one pass over the parameters, not the batch.
    metrics = {**aux, "lr": lr, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params)}
    return new_state, metrics


# ---------------------------------------------------------------- the sharding contract


def under_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """fn traced with `mesh` (abstract) in context, so model code that runs per shard
    (`jax.shard_map`, e.g. the sparse TopK path) finds the mesh without being given it."""
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
    return traced


@dataclasses.dataclass
class StepContract:
    """Shardings, donation and compiled functions of one run, declared in one place.

    step_fn(state, batch[B, d_in]) -> (state, metrics)            state donated
    resampling (`saejax.train.resample.resample` drives these):
      dead_count_fn(state) -> n_dead
      resample_begin_fn(state) -> draws
      resample_chunk_fn(state, draws, inputs[c, d_in]) -> draws    draws donated
      resample_apply_fn(state, draws) -> (state, n_resampled)      state donated
    Batches and resampling inputs are sharded over `data` by rows; the state as in
    `saejax.train.state.state_shardings`, the draws' [F, d] rows over features like W_dec;
    metrics and counts replicated.
    """

    cfg: Config
    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    state_shardings: TrainState
    batch_sharding: NamedSharding
    step_fn: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
    dead_count_fn: Callable[[TrainState], jax.Array]
    resample_begin_fn: Callable[[TrainState], resample_lib.Draws]
    resample_chunk_fn: Callable[..., resample_lib.Draws]
    resample_apply_fn: Callable[..., tuple[TrainState, jax.Array]]

    @classmethod
    def build(cls, cfg: Config, mesh: Mesh) -> "StepContract":
        graphdef = get_family(cfg.sae.arch).graphdef(cfg.sae)
        tx = make_optimizer(cfg)
        state_sh = state_shardings(cfg, mesh, tx)
        batch_sh = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)

        rows = sharding.named(mesh, ("d_sae", "d_in"))
        draws_sh = resample_lib.Draws(rows, rows, rep, rep, rep, rep)
        return cls(
            cfg, mesh, graphdef, tx, state_sh, batch_sh,
            step_fn=jax.jit(under_mesh(mesh, partial(train_step, graphdef=graphdef, cfg=cfg,
                                                     tx=tx)),
                            in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep),
                            donate_argnums=(0,)),
            dead_count_fn=jax.jit(lambda s: resample_lib.dead_mask(s).sum(),
                                  in_shardings=(state_sh,), out_shardings=rep),
            resample_begin_fn=jax.jit(resample_lib.begin, in_shardings=(state_sh,),
                                      out_shardings=draws_sh),
            resample_chunk_fn=jax.jit(
                lambda s, d, x: resample_lib.draw_chunk(s, d, x, graphdef=graphdef),
                in_shardings=(state_sh, draws_sh, batch_sh), out_shardings=draws_sh,
                donate_argnums=(1,)),
            resample_apply_fn=jax.jit(
                lambda s, d: resample_lib.apply(s, d, cfg=cfg, tx=tx),
                in_shardings=(state_sh, draws_sh), out_shardings=(state_sh, rep),
                donate_argnums=(0,)),
        )

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (the restore target for checkpoints)."""
        shapes = jax.eval_shape(lambda: init_state(self.cfg, self.tx, None))
        return sharding.abstract(shapes, self.state_shardings)

    def init(self, sample: jax.Array | None) -> TrainState:
        """Fresh state created already sharded; `sample` ([N, d_in]) drives data-dependent init."""
        return jax.jit(lambda s: init_state(self.cfg, self.tx, s),
                       out_shardings=self.state_shardings)(sample)
