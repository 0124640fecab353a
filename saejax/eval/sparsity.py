"""Sparsity and fidelity of an SAE on held-out activations, exact over any number of batches.

The metrics are those defined in `saejax.sae.stats` (mse, fvu, l0, density, dead, ultralow,
dense), with μ in FVU the mean over all evaluated tokens instead of a batch mean. Per batch, on
device (inside the evaluation's jitted step, `batch_sums`): sums, never means -- squared
reconstruction error, squared deviation from the evaluation mean, per-feature firing counts and
the count of tokens at each L0 -- so the totals over all batches give the metrics over all
evaluated tokens exactly, whatever the batching. On host at the end, `sparsity_summary`, which
adds the distribution of per-token L0 (`l0_distribution`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saejax.sae.stats import density_stats, fidelity

L0_HIST_BINS = 50
"""At most this many bins in the reported per-token L0 histogram (integer-aligned)."""


def batch_sums(x: jax.Array, x_hat: jax.Array, fired: jax.Array, mean: jax.Array,
               mask: jax.Array) -> tuple[dict, dict]:
    """One batch's sums over its counted rows (jnp, jit-friendly).

    x, x_hat [N, d] activations and reconstructions; fired [N, F] bool, which features fire on
    each row (the SAE's own rule); mean [d] the evaluation mean of x; mask [N] bool, the rows
    that count. Returns
    ({"sq_err", "total_var"}: float32 scalars,
     {"fire_count": int32 [F], "l0_count": int32 [F + 1]}: per-feature / per-L0 token counts).
    """
    keep = mask[:, None]
    x = x.astype(jnp.float32)
    sq_err = jnp.sum(jnp.where(keep, jnp.square(x_hat.astype(jnp.float32) - x), 0.0))
    total_var = jnp.sum(jnp.where(keep, jnp.square(x - mean.astype(jnp.float32)), 0.0))
    fired = fired & keep
    l0 = fired.sum(axis=-1, dtype=jnp.int32)  # [N]
    counts = {
        "fire_count": fired.sum(axis=0, dtype=jnp.int32),
        # tokens at each L0 value; uncounted rows add 0 (they sit at index 0 with weight 0)
        "l0_count": jnp.zeros(fired.shape[-1] + 1, jnp.int32).at[l0].add(mask.astype(jnp.int32)),
    }
    return {"sq_err": sq_err, "total_var": total_var}, counts


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


def sparsity_summary(sq_err: float, total_var: float, fire_count: np.ndarray,
                     l0_count: np.ndarray, d_in: int) -> dict:
    """Every held-out sparsity/fidelity metric of one SAE from its accumulated sums.

    The token count is l0_count's total (every counted token has exactly one L0)."""
    n_tokens = int(np.asarray(l0_count, np.int64).sum())
    return {"n_tokens": n_tokens, **fidelity(sq_err, total_var, n_tokens, d_in),
            **l0_distribution(l0_count), **density_stats(fire_count, n_tokens)}
