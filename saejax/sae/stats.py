"""What the sparsity and fidelity metrics mean, in one place for training and evaluation.

Over N tokens of activations x [N, d], reconstructions x̂ and the firing mask (`fired`: which
features fire on which token, the SAE module's own rule):

    mse   = Σ‖x̂ − x‖² / (N·d)                  (mean over vector elements, as in training)
    fvu   = Σ‖x̂ − x‖² / Σ‖x − μ‖²              μ = mean of x over the N tokens
    l0    = mean over tokens of the number of features firing
    density_i = (tokens where feature i fires) / N
    dead      = density 0 (never fires on the tokens seen; in training: in the last window)
    ultralow  = 0 < density < 1e-6 (the paper's threshold); only resolvable when N > 1e6,
                since a feature that fires at all has density ≥ 1/N
    dense     = density > 1%

Fractions are of all features (the paper's "168 dead (4.1%)" counts against 4,096). Device-side
functions take jnp arrays and are jit-friendly; the rest work on host numpy counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DENSITY_BINS = np.linspace(-8, 0, 33)
"""Edges of the log10 feature-density histogram (the paper's axis)."""
DENSE_THRESHOLD = 0.01
"""A feature firing on more than this fraction of tokens counts as dense."""
ULTRALOW_DENSITY = 1e-6
"""Towards Monosemanticity's "ultralow density" threshold (fraction of tokens)."""


def reconstruction_metrics(x: jax.Array, x_hat: jax.Array, fired: jax.Array) -> dict:
    """MSE (mean over elements), FVU and L0 of one batch; `fired` is the [B, F] bool mask.
    float32 whatever the compute dtype (`saejax.sae.precision`)."""
    x, x_hat = x.astype(jnp.float32), x_hat.astype(jnp.float32)
    err = jnp.square(x_hat - x)
    total_var = jnp.sum(jnp.square(x - x.mean(axis=0)))
    return {
        "mse": err.mean(),
        "fvu": err.sum() / jnp.maximum(total_var, 1e-12),
        "l0": fired.sum(axis=-1).mean(),
    }


HELDOUT_CHUNK = 4096
"""Rows per piece of the held-out evaluation: bounds its [rows, F] activations."""


def heldout_metrics(graphdef, params: dict, input_scale, x: jax.Array) -> dict:
    """MSE, FVU, L0 on held-out activations x [N, d_in] (raw; scaled like training inputs), for
    the SAE module `nnx.merge(graphdef, params)`; host floats. Evaluated HELDOUT_CHUNK rows at a
    time, so memory does not grow with N; μ of the FVU is the mean over all N rows."""

    @jax.jit
    def run(params, scale, x):
        xs = x * scale
        mean = xs.mean(axis=0)
        sae = nnx.merge(graphdef, params)

        def sums(rows):
            f = sae.encode(rows)
            return (jnp.square(sae.decode(f) - rows).sum(), jnp.square(rows - mean).sum(),
                    sae.fired(f).sum(dtype=jnp.int32))

        n, d = xs.shape
        k = HELDOUT_CHUNK if n % HELDOUT_CHUNK == 0 else n
        sq_err, total_var, fired = jax.tree.map(
            lambda v: v.sum(axis=0), jax.lax.map(sums, xs.reshape(n // k, k, d)))
        return {"mse": sq_err / (n * d), "fvu": sq_err / jnp.maximum(total_var, 1e-12),
                "l0": fired / n}

    return {k: float(v) for k, v in jax.device_get(run(params, input_scale, x)).items()}


def fidelity(sq_err: float, total_var: float, n_tokens: int, d_in: int) -> dict:
    """MSE (mean over elements) and FVU from summed squared error and variance."""
    return {"mse": sq_err / max(n_tokens * d_in, 1), "fvu": sq_err / max(total_var, 1e-12)}


def density_summary(fire_count: np.ndarray, tokens: int) -> dict:
    """Dense fraction and log10-density histogram from per-feature firing counts over `tokens`."""
    density = fire_count / max(tokens, 1)
    nonzero = density[density > 0]
    counts, _ = np.histogram(np.log10(nonzero), bins=DENSITY_BINS)
    return {
        "dense_fraction": float(np.mean(density > DENSE_THRESHOLD)),
        "density_hist": {"log10_edges": DENSITY_BINS.tolist(), "counts": counts.tolist(),
                         "zero": int(np.sum(density == 0))},
    }


def dead_fraction(step: int, last_fired: np.ndarray, window_steps: int) -> float:
    """Fraction of features that have not fired in the last `window_steps` steps."""
    return float(np.mean(step - last_fired >= window_steps))


def density_stats(fire_count: np.ndarray, n_tokens: int) -> dict:
    """Dead / ultralow / dense counts and fractions and the log10-density histogram, from
    per-feature firing counts [F] over n_tokens tokens."""
    fire_count = np.asarray(fire_count, np.int64)
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    n_features = len(fire_count)
    density = fire_count / n_tokens
    dead = fire_count == 0
    counts = {
        "dead": int(dead.sum()),
        "ultralow": int((~dead & (density < ULTRALOW_DENSITY)).sum()),
        "dense": int((density > DENSE_THRESHOLD).sum()),
    }
    out = {"n_features": n_features}
    for name, c in counts.items():
        out[name] = c
        out[f"{name}_fraction"] = c / n_features
    # With N <= 1e6 tokens a live feature has density >= 1/N >= 1e-6: ultralow is always 0.
    out["ultralow_resolvable"] = n_tokens * ULTRALOW_DENSITY > 1
    out["density_hist"] = density_summary(fire_count, n_tokens)["density_hist"]
    return out
