"""Mesh construction, the logical-axis rules table, and host-local -> global batches.

Model code names logical axes only (`batch`, `d_in`, `d_sae`); this file is the one place that
maps them to the mesh axes `data` and `model`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from saejax.config import MeshConfig, resolve_mesh_shape

MESH_AXES = ("data", "model")

# The rules table: logical axis name -> mesh axis (None = replicated).
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "d_sae": "model",
    "d_in": None,
    # language-model parameters (saejax.lm): replicated for now; tensor parallelism would map
    # `heads` and `d_mlp` to "model".
    "vocab": None,
    "d_model": None,
    "n_ctx": None,
    "heads": None,
    "kv_heads": None,
    "d_head": None,
    "d_mlp": None,
}


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A ("data", "model") mesh over all devices (or `devices`), Auto axes so XLA propagates."""
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(cfg, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_spec(names: tuple[str | None, ...] | None) -> P:
    """PartitionSpec for a tuple of logical axis names (None / unknown names -> replicated)."""
    if not names:
        return P()
    return P(*(LOGICAL_RULES.get(n) if n else None for n in names))


def named(mesh: Mesh, names: tuple[str | None, ...] | None) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Activation batches [B, d_in]: rows over `data`."""
    return named(mesh, ("batch", "d_in"))


def host_batch_to_global(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """The one function that turns this process's rows into a global array sharded over `data`.

    With one process this is a plain device_put; with several, each contributes its contiguous
    rows of the global batch (see `process_rows`).
    """
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def process_rows(mesh, n: int) -> tuple[int, int]:
    """[start, stop): the rows of an n-row global batch that this process's devices hold.

    With several processes this is not always an even split by process index: when the `model`
    axis spans processes, processes share rows (with `data` = 1, every process feeds all rows)."""
    if jax.process_count() == 1:
        return 0, n
    index = batch_sharding(mesh).addressable_devices_indices_map((n, 1))
    starts = sorted({sl[0].indices(n)[0] for sl in index.values()})
    stops = sorted({sl[0].indices(n)[1] for sl in index.values()})
    if starts[1:] != stops[:-1]:
        raise ValueError(f"this process's devices hold non-contiguous rows of the batch: {index}")
    return starts[0], stops[-1]
