"""The one interface the training loop reads data through, and its host-side implementation.

A `BatchProvider` serves global arrays whose rows are sharded over the `batch` axis, addressed
by the step (so a resumed run needs no saved data position). Host-side sources (synthetic, npy,
store: `saejax.data.source.ActivationSource`) become one through `HostProvider`; the on-the-fly
feed (`saejax.data.onthefly.OnTheFlyFeed`) computes its batches on the devices and is one.
"""

from __future__ import annotations

from typing import Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from saejax.data.prefetch import Prefetcher
from saejax.sharding import host_batch_to_global, process_rows


class Batches(Protocol):
    def next(self) -> jax.Array:
        """The batch of the next step."""
        ...

    def close(self) -> None:
        ...


class BatchProvider(Protocol):
    batch_dtype: np.dtype
    """dtype of the batches served: float32, or bfloat16 for data held so (a bfloat16 store or
    on-the-fly buffer), which the train step widens on the devices (compile it for this dtype).
    `sample` rows are float32."""

    def batch(self, step: int) -> jax.Array:
        """The global batch of training step `step`."""
        ...

    def batches(self, start: int, stop: int) -> Batches:
        """The batches of steps start, start+1, ..., stop-1, in order (possibly read ahead)."""
        ...

    def sample(self, n: int, seed: int) -> jax.Array:
        """n rows for statistics (initialisation, resampling, the held-out summary), deterministic
        in (n, seed); n must be a multiple of the `batch` axis size."""
        ...

    def summary_metrics(self, decoder: jax.Array) -> dict:
        """Ground-truth metrics of a trained decoder [F, d_in], or {} (see ActivationSource)."""
        ...


class HostProvider:
    """A host-side source as a `BatchProvider`: each process reads only the rows its devices
    hold (`process_rows`), upcoming steps on a background thread (`Prefetcher`).

    `source` needs `rows(step, start, stop, batch_size)` (and, for `sample` and
    `summary_metrics`, those methods of `ActivationSource`)."""

    def __init__(self, source, mesh: Mesh, batch_size: int):
        self.source, self.mesh, self.batch_size = source, mesh, batch_size
        self._rows = process_rows(mesh, batch_size)
        self.batch_dtype = np.dtype(getattr(source, "batch_dtype", np.float32))

    def batch(self, step: int) -> jax.Array:
        start, stop = self._rows
        return host_batch_to_global(self.source.rows(step, start, stop, self.batch_size),
                                    self.mesh)

    def batches(self, start: int, stop: int) -> Prefetcher:
        return Prefetcher(self.batch, start, stop)

    def sample(self, n: int, seed: int) -> jax.Array:
        start, stop = process_rows(self.mesh, n)
        return host_batch_to_global(self.source.sample(n, seed)[start:stop], self.mesh)

    def summary_metrics(self, decoder: jax.Array) -> dict:
        return self.source.summary_metrics(decoder)
