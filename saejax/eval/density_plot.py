"""The feature-density histogram, drawn as in Towards Monosemanticity.

x: log10 feature density (fraction of evaluated tokens on which the feature fires), y: number of
features. Dead features (density 0, no logarithm) get their own labelled bar left of the axis
break; dashed lines mark the ultralow (1e-6) and dense (1%) thresholds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from saejax.sae.stats import DENSE_THRESHOLD, ULTRALOW_DENSITY

BIN_WIDTH = 0.2
"""Histogram bin width in log10 units."""
LOWEST = -8.0
"""The x-axis starts here (or lower, when a feature is rarer than that)."""


def plot_density(fire_count: np.ndarray, n_tokens: int, path: str | Path,
                 title: str = "") -> Path:
    """Write the histogram of log10 density of per-feature firing counts [F] over n_tokens
    tokens to `path` (PNG); returns the path."""
    # The Agg canvas directly, not pyplot: no global backend switch, no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fire_count = np.asarray(fire_count)
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    density = fire_count / n_tokens
    alive = np.log10(density[density > 0])
    n_dead = int(np.sum(density == 0))
    lo = min(LOWEST, math.floor(alive.min())) if len(alive) else LOWEST
    bins = np.arange(lo, BIN_WIDTH / 2, BIN_WIDTH)
    dead_x = lo - 1.0

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(alive, bins=bins, color="tab:blue", label=f"alive ({len(alive)})")
    ax.bar([dead_x], [n_dead], width=2 * BIN_WIDTH, color="tab:red", label=f"dead ({n_dead})")
    ax.axvline(np.log10(ULTRALOW_DENSITY), color="gray", ls="--", lw=1, label="ultralow (1e-6)")
    ax.axvline(np.log10(DENSE_THRESHOLD), color="gray", ls=":", lw=1, label="dense (1%)")
    ticks = list(range(int(lo), 1))
    ax.set_xticks([dead_x, *ticks], ["dead", *map(str, ticks)])
    ax.set_xlim(dead_x - 0.5, 0.2)
    ax.set_xlabel("log10 feature density (fraction of tokens firing)")
    ax.set_ylabel("number of features")
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}{len(fire_count)} features, {n_dead} dead, {n_tokens:,} tokens")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path
