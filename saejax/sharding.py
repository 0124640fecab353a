"""Mesh construction, shardings from the logical-axis rules table, host-local -> global batches.

Model, data and training code name logical axes only (`batch`, `d_in`, `d_sae`; sizes through
`axis_size`); the rules table that maps them to the mesh axes `data` and `model` is
`saejax.axes` (layer 0, so SAE code can read it too); this file builds meshes and shardings from it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from saejax.axes import LOGICAL_RULES, MESH_AXES, logical_spec  # noqa: F401 (re-exported)
from saejax.config import MeshConfig, resolve_mesh_shape


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A ("sae", "data", "model") mesh over all devices (or `devices`), Auto axes so XLA
    propagates."""
    devices = jax.devices() if devices is None else devices
    shape = (cfg.sae, *resolve_mesh_shape(cfg, len(devices)))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def named(mesh: Mesh, names: tuple[str | None, ...] | None) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(names))


def axis_size(mesh: Mesh, name: str) -> int:
    """How many ways the logical axis `name` is split on `mesh` (1 when it is replicated)."""
    axis = LOGICAL_RULES.get(name)
    return 1 if axis is None else mesh.shape[axis]


def over_members(tree: Any) -> Any:
    """The shardings of a sweep's stacked states: each of `tree`'s shardings with a leading
    `member` axis (sweep members spread over the mesh axis the rules table maps it to)."""
    axis = LOGICAL_RULES["member"]
    return jax.tree.map(lambda s: NamedSharding(s.mesh, P(axis, *s.spec)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Activation batches [B, d_in]: rows over `data`."""
    return named(mesh, ("batch", "d_in"))


def abstract(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of the tree `shapes` (e.g. from jax.eval_shape) carrying `shardings`:
    a restore target for checkpoints and the input of ahead-of-time compilation."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of `tx`'s state: each moment laid out like its parameter, the rest (counts,
    schedule state) replicated. Needed because `jax.eval_shape(tx.init, ...)` drops shardings."""
    rep = replicated(mesh)
    return optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: rep)


def host_batch_to_global(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """The one function that turns this process's rows into a global array whose first axis is
    `batch` (the rest replicated): activations [B, d_in], token contexts [B, T], weights [B].

    With one process this is a plain device_put; with several, each contributes its contiguous
    rows of the global batch (see `process_rows`).
    """
    rows = named(mesh, ("batch",) + (None,) * (np.ndim(local) - 1))
    return jax.make_array_from_process_local_data(rows, local)


def to_host(tree):
    """`jax.device_get` that also works in multi-process runs for arrays sharded over devices of
    other processes (e.g. per-feature records when the `model` axis spans processes): those are
    all-gathered first. A collective then, so every process must call it."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)
    return jax.tree.map(one, tree)


def process_rows(mesh, n: int) -> tuple[int, int]:
    """[start, stop): the rows of an n-row global batch that this process's devices hold.

    With several processes this is not always an even split by process index: when the `model`
    axis spans processes, processes share rows (with `data` = 1, every process feeds all rows)."""
    if jax.process_count() == 1:
        return 0, n
    index = named(mesh, ("batch",)).addressable_devices_indices_map((n,))
    starts = sorted({sl[0].indices(n)[0] for sl in index.values()})
    stops = sorted({sl[0].indices(n)[1] for sl in index.values()})
    if starts[1:] != stops[:-1]:
        raise ValueError(f"this process's devices hold non-contiguous rows of the batch: {index}")
    return starts[0], stops[-1]
