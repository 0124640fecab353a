"""How a multi-host run splits a global batch among processes, for the data-source tests."""

from __future__ import annotations

import numpy as np


def host_rows(source, step: int, batch_size: int, process_index: int,
              process_count: int) -> np.ndarray:
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
