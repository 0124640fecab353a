"""The one interface every activation source implements, and the per-process slicing helper.

Sources live on the host and speak numpy. The training loop never iterates a source: it asks
for the rows of step `step`, so the data position is a pure function of the step. That is what
makes checkpoint resume exact (no iterator state to save) and what lets each process of a
multi-host run read only the rows it feeds to its own devices.
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


def host_rows(source: ActivationSource, step: int, batch_size: int,
              process_index: int, process_count: int) -> np.ndarray:
    """The contiguous slice of step `step`'s global batch that process `process_index` owns.

    Process p gets rows [p*b, (p+1)*b) with b = batch_size / process_count, matching the order in
    which `jax.make_array_from_process_local_data` lays process-local rows along the data axis."""
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is outside [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the number of processes "
            f"({process_count})")
    per = batch_size // process_count
    return source.rows(step, process_index * per, (process_index + 1) * per, batch_size)
