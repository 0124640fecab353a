"""The one interface every host-side activation source implements, and its argument checks.

Sources live on the host and speak numpy. The training loop never iterates a source: its
batch provider (`saejax.data.provider.HostProvider`) asks for the rows of step `step`, so the
data position is a pure function of the step. That is what makes checkpoint resume exact (no
iterator state to save) and what lets each process of a multi-host run read only the rows it
feeds to its own devices.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ActivationSource(Protocol):
    """A deterministic, randomly addressable stream of activation vectors."""

    d_in: int
    """Width of each activation vector."""

    def rows(self, step: int, start: int, stop: int, batch_size: int) -> np.ndarray:
        """Rows [start, stop) of the *global* batch for training step `step` (global batch has
        `batch_size` rows), float32, shape [stop-start, d_in]. Pure function of (step, start, stop,
        batch_size) and the source's config/seed: calling twice gives identical bytes, and
        concatenating rows(s,0,k,B) and rows(s,k,B,B) equals rows(s,0,B,B) bit for bit for any k
        (so each process of a multi-host run can read only its slice, and data position is a pure
        function of the step, which is what makes checkpoint resume exact)."""
        ...

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n rows for statistics (geometric median, norm scaling, resampling candidates), float32,
        deterministic in seed, drawn from the same distribution as training rows."""
        ...

    def summary_metrics(self, decoder) -> dict:
        """Ground-truth metrics of a trained decoder [F, d_in] (a global jax.Array) for the
        run's final summary, e.g. MMCS for synthetic data; {} for sources without ground truth.
        Every process calls it (reading a sharded decoder back may be a collective)."""
        ...


def check_row_request(step: int, start: int, stop: int, batch_size: int) -> None:
    """Reject a `rows` request outside the global batch, naming the offending argument.

    Sources call this first so that an off-by-one in a caller fails loudly instead of silently
    reading rows of a neighbouring step."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0 <= start <= stop <= batch_size:
        raise ValueError(
            f"row range start={start}, stop={stop} must satisfy 0 <= start <= stop <= "
            f"batch_size={batch_size}")


def check_sample_request(n: int, seed: int) -> None:
    """Reject a `sample` request numpy's seeding could not honour (it needs seed >= 0)."""
    if n < 0:
        raise ValueError(f"sample size n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"sample seed must be >= 0, got {seed}")
