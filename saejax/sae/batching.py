"""Branches of the SAE math when a sweep's members share one step (`jax.vmap` over members).

Under `vmap`, a `lax.cond` whose predicate differs between members becomes a select that runs
both branches for every member, every step: TopK's AuxK, which a step skips while no latent is
dead, would then always run (twice the step's time at k_aux = 256). `cond` here runs the branch
when any member needs it (the predicate reduced over the member axis, so it stays a real
`cond`) and keeps each member's own result. Outside a sweep it is `lax.cond`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

_MEMBER_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("member_axis",
                                                                          default=None)


@contextlib.contextmanager
def over_members(axis_name: str):
    """While tracing a function vmapped over members with this `axis_name`."""
    token = _MEMBER_AXIS.set(axis_name)
    try:
        yield
    finally:
        _MEMBER_AXIS.reset(token)


def cond(pred: jax.Array, true_fn: Callable, false_fn: Callable, *operands):
    """`lax.cond(pred, true_fn, false_fn, *operands)`, kept a branch across a sweep's members
    (module docstring): each member gets the result of its own predicate."""
    axis = _MEMBER_AXIS.get()
    if axis is None:
        return lax.cond(pred, true_fn, false_fn, *operands)

    def each_own(*ops):
        return jax.tree.map(lambda t, f: jnp.where(pred, t, f), true_fn(*ops), false_fn(*ops))

    anyone = lax.pmax(pred.astype(jnp.int32), axis) > 0
    return lax.cond(anyone, each_own, false_fn, *operands)
