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
from saejax.sae import SAE, batching, get_family
from saejax.train import resample as resample_lib
from saejax.train.state import (TrainState, init_state, loss_context, lr_at, make_optimizer,
                                state_shardings)


def train_step(state: TrainState, batch: jax.Array, *, graphdef, cfg: Config,
               tx: optax.GradientTransformation, freeze: bool = False) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch [B, d_in] of raw activations.

    freeze (a sweep member's step): once a loss or gradient is NaN/Inf, the step leaves the
    parameters as they were (zero gradients, zero LR: no select over the state, so the update
    fuses as before), the family state too, and the member is frozen from then on."""
    x = batch * state.input_scale
    ctx = loss_context(state)

    def loss_fn(params):
        return nnx.merge(graphdef, params).loss(x, ctx)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    sae: SAE = nnx.merge(graphdef, state.params)
    grads = sae.prepare_grads(state.params, grads)
    lr = lr_at(cfg, state.hparams["lr"], state.step)
    finite = jnp.isfinite(loss)
    if freeze:
        finite &= jnp.isfinite(optax.tree.norm(grads))
        stopped = (state.nonfinite_step >= 0) | ~finite
        grads = jax.tree.map(lambda g: jnp.where(stopped, jnp.zeros_like(g), g), grads)
        lr = jnp.where(stopped, 0.0, lr)
        aux["state"] = jax.tree.map(lambda old, new: jnp.where(stopped, old, new),
                                    state.family_state, aux.get("state", state.family_state))
    opt_state = optax.tree.set(state.opt_state, learning_rate=lr)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = sae.constrain(optax.apply_updates(state.params, updates))

    step = state.step + 1
    fired = aux.pop("fired")
    window_start = state.step % cfg.train.log_every == 0
    bad = (state.nonfinite_step < 0) & ~finite
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


def keep_stopped(old: TrainState, new: TrainState) -> TrainState:
    """A frozen sweep member (its loss went NaN/Inf: `train_step`'s freeze) keeps its state
    through a resampling event (only the step count and the record of the bad step move)."""
    stopped = (old.nonfinite_step >= 0) | (new.nonfinite_step >= 0)  # [M]

    def pick(o, n):
        return jnp.where(stopped.reshape(stopped.shape + (1,) * (n.ndim - 1)), o, n)

    kept = jax.tree.map(pick, old, new)
    return kept.replace(step=new.step, nonfinite_step=new.nonfinite_step)


def for_members(fn: Callable, shared: tuple[int, ...] = (), freeze: bool = False) -> Callable:
    """fn over a leading member axis of its state arguments (`jax.vmap`, members spread over
    the mesh axis of `member`); the arguments at positions `shared` (batches, inputs) are the
    same for every member. `freeze`: fn returns (state, ...) and frozen members keep theirs."""
    def batched(*args):
        axes = tuple(None if i in shared else 0 for i in range(len(args)))
        with batching.over_members("members"):  # the SAE's branches stay branches (its cond)
            out = jax.vmap(fn, in_axes=axes, axis_name="members",
                           spmd_axis_name=sharding.LOGICAL_RULES["member"])(*args)
        if freeze:
            out = (keep_stopped(args[0], out[0]), *out[1:])
        return out
    return batched


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

    A sweep group's contract (`members`: its members' configs) computes the same functions for
    all members at once: every state leaf, draw, metric and count has a leading member axis
    (sharded over the mesh axis of `member`), batches and inputs are shared, and a member whose
    loss went NaN/Inf is frozen (`train_step`'s freeze, `keep_stopped`).
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
    members: tuple[Config, ...] = ()
    """A sweep group's members' configs (they differ from `cfg` only in fields carried as
    data); () for a single SAE."""

    @classmethod
    def build(cls, cfg: Config, mesh: Mesh, members: tuple[Config, ...] = ()) -> "StepContract":
        graphdef = get_family(cfg.sae.arch).graphdef(cfg.sae)
        tx = make_optimizer(cfg)
        state_sh = state_shardings(cfg, mesh, tx)
        batch_sh = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)
        rows = sharding.named(mesh, ("d_sae", "d_in"))
        draws_sh = resample_lib.Draws(rows, rows, rep, rep, rep, rep)
        # Per member: every state leaf, draw and output gets a leading member axis.
        def each(fn: Callable, shared: tuple[int, ...] = (), freeze: bool = False) -> Callable:
            return for_members(fn, shared, freeze) if members else fn

        per = sharding.over_members if members else (lambda tree: tree)
        state_sh, draws_sh, out = per(state_sh), per(draws_sh), per(rep)
        step = partial(train_step, graphdef=graphdef, cfg=cfg, tx=tx, freeze=bool(members))
        return cls(
            cfg, mesh, graphdef, tx, state_sh, batch_sh,
            step_fn=jax.jit(under_mesh(mesh, each(step, shared=(1,))),
                            in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, out),
                            donate_argnums=(0,)),
            dead_count_fn=jax.jit(each(lambda s: resample_lib.dead_mask(s).sum()),
                                  in_shardings=(state_sh,), out_shardings=out),
            resample_begin_fn=jax.jit(each(resample_lib.begin), in_shardings=(state_sh,),
                                      out_shardings=draws_sh),
            resample_chunk_fn=jax.jit(
                each(partial(resample_lib.draw_chunk, graphdef=graphdef), shared=(2,)),
                in_shardings=(state_sh, draws_sh, batch_sh), out_shardings=draws_sh,
                donate_argnums=(1,)),
            resample_apply_fn=jax.jit(
                each(partial(resample_lib.apply, cfg=cfg, tx=tx), freeze=True),
                in_shardings=(state_sh, draws_sh), out_shardings=(state_sh, out),
                donate_argnums=(0,)),
            members=tuple(members),
        )

    def _init(self, sample: jax.Array | None) -> TrainState:
        """The initial state (stacked over members: each from its own config)."""
        if not self.members:
            return init_state(self.cfg, self.tx, sample)
        states = [init_state(c, make_optimizer(c), sample) for c in self.members]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (the restore target for checkpoints)."""
        return sharding.abstract(jax.eval_shape(lambda: self._init(None)), self.state_shardings)

    def init(self, sample: jax.Array | None) -> TrainState:
        """Fresh state created already sharded; `sample` ([N, d_in]) drives data-dependent init."""
        return jax.jit(self._init, out_shardings=self.state_shardings)(sample)

    def member_state(self, state: TrainState, i: int) -> TrainState:
        """Member i's state out of a group's stacked state, laid out as a single SAE's."""
        solo = state_shardings(self.cfg, self.mesh, self.tx)
        return jax.jit(lambda s: jax.tree.map(lambda x: x[i], s), out_shardings=solo)(state)
