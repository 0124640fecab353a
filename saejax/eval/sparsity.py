"""Sparsity and fidelity of an SAE on held-out activations, exact over any number of batches.

Per batch, on device (inside the evaluation's jitted step, `batch_sums`): sums, never means --
squared reconstruction error, squared deviation from the evaluation mean, per-feature firing
counts and the count of tokens at each L0 -- so the totals over all batches give the metrics over
all evaluated tokens exactly, whatever the batching. On host at the end, `sparsity_summary`:

    mse   = Σ‖x̂ − x‖² / (N·d)                  (mean over vector elements, as in training)
    fvu   = Σ‖x̂ − x‖² / Σ‖x − μ‖²              μ = mean of x over the N evaluated tokens; the
                                              definition of `reconstruction_metrics`, with μ
                                              the evaluation mean instead of a batch mean
    l0    = mean over tokens of #{i : f_i > 0}, and its distribution (histogram of per-token L0)
    density_i = (tokens where feature i fires) / N
    dead      = density 0 (never fires on the evaluated tokens)
    ultralow  = 0 < density < 1e-6 (the paper's threshold); only resolvable when N > 1e6,
                since a feature that fires at all has density ≥ 1/N
    dense     = density > 1% (`saejax.train.metrics.DENSE_THRESHOLD`)

Fractions are of all features (the paper's "168 dead (4.1%)" counts against 4,096).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saejax.sae.base import SAE
from saejax.train.metrics import DENSE_THRESHOLD, density_summary

ULTRALOW_DENSITY = 1e-6
"""Towards Monosemanticity's "ultralow density" threshold (fraction of tokens)."""
L0_HIST_BINS = 50
"""At most this many bins in the reported per-token L0 histogram (integer-aligned)."""


def batch_sums(x: jax.Array, x_hat: jax.Array, f: jax.Array, mean: jax.Array,
               mask: jax.Array) -> tuple[dict, dict]:
    """One batch's sums over its counted rows (jnp, jit-friendly).

    x, x_hat [N, d] activations and reconstructions; f [N, F] feature activations; mean [d] the
    evaluation mean of x; mask [N] bool, the rows that count. Returns
    ({"sq_err", "total_var"}: float32 scalars,
     {"fire_count": int32 [F], "l0_count": int32 [F + 1]}: per-feature / per-L0 token counts).
    """
    keep = mask[:, None]
    x = x.astype(jnp.float32)
    sq_err = jnp.sum(jnp.where(keep, jnp.square(x_hat.astype(jnp.float32) - x), 0.0))
    total_var = jnp.sum(jnp.where(keep, jnp.square(x - mean.astype(jnp.float32)), 0.0))
    fired = SAE.fired(f) & keep
    l0 = fired.sum(axis=-1, dtype=jnp.int32)  # [N]
    counts = {
        "fire_count": fired.sum(axis=0, dtype=jnp.int32),
        # tokens at each L0 value; uncounted rows add 0 (they sit at index 0 with weight 0)
        "l0_count": jnp.zeros(f.shape[-1] + 1, jnp.int32).at[l0].add(mask.astype(jnp.int32)),
    }
    return {"sq_err": sq_err, "total_var": total_var}, counts


def fidelity(sq_err: float, total_var: float, n_tokens: int, d_in: int) -> dict:
    """MSE (mean over elements) and FVU from summed squared error and variance."""
    return {"mse": sq_err / max(n_tokens * d_in, 1), "fvu": sq_err / max(total_var, 1e-12)}


def l0_distribution(l0_count: np.ndarray) -> dict:
    """Mean, median, p90, max of per-token L0 and a histogram, from l0_count [F + 1]
    (l0_count[k] = tokens with exactly k features firing)."""
    l0_count = np.asarray(l0_count, np.int64)
    n = int(l0_count.sum())
    if n == 0:
        raise ValueError("l0_count holds no tokens")
    values = np.arange(len(l0_count))
    cdf = np.cumsum(l0_count)
    top = int(values[l0_count > 0].max())
    width = -(-(top + 1) // L0_HIST_BINS)  # ceil: integer bins of equal width covering 0..top
    edges = np.arange(0, top + width + 1, width)
    return {
        "l0": float(values @ l0_count / n),
        "l0_median": int(np.searchsorted(cdf, 0.5 * n)),
        "l0_p90": int(np.searchsorted(cdf, 0.9 * n)),
        "l0_max": top,
        # bin j holds tokens with edges[j] <= L0 < edges[j + 1]
        "l0_hist": {"edges": edges.tolist(),
                    "counts": np.add.reduceat(l0_count[:top + 1], edges[:-1]).tolist()},
    }


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


def sparsity_summary(sq_err: float, total_var: float, fire_count: np.ndarray,
                     l0_count: np.ndarray, d_in: int) -> dict:
    """Every held-out sparsity/fidelity metric of one SAE from its accumulated sums.

    The token count is l0_count's total (every counted token has exactly one L0)."""
    n_tokens = int(np.asarray(l0_count, np.int64).sum())
    return {"n_tokens": n_tokens, **fidelity(sq_err, total_var, n_tokens, d_in),
            **l0_distribution(l0_count), **density_stats(fire_count, n_tokens)}
