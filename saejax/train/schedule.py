"""The learning-rate schedule both trainers use: linear warm-up, then constant or a decay."""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp
import optax


def lr_schedule(lr: float, warmup_steps: int, decay: Literal["constant", "linear", "cosine"],
                total_steps: int, min_lr_ratio: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """Step (0-based, an int array) -> float32 learning rate. Step s < warmup_steps uses
    lr·(s+1)/warmup_steps; after the warm-up, `constant` stays at lr, `linear` and `cosine`
    go down to lr·min_lr_ratio at the last step (an optax schedule, usable with
    `optax.inject_hyperparams`)."""
    w = warmup_steps
    n = max(total_steps - w, 1)
    after = {
        "constant": optax.constant_schedule(lr),
        "linear": optax.linear_schedule(lr, lr * min_lr_ratio, n),
        "cosine": optax.cosine_decay_schedule(lr, n, alpha=min_lr_ratio),
    }[decay]

    def at(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step)
        warm = lr * jnp.minimum(1.0, (step + 1).astype(jnp.float32) / max(w, 1))
        return jnp.where(step < w, warm, after(jnp.maximum(step - w, 0))).astype(jnp.float32)

    return at
