"""The logical-axis rules table: the one place that names mesh axes.

Model, data and training code name logical axes only (`batch`, `d_in`, `d_sae`); this table maps
them to the mesh axes `sae` (sweep members), `data` and `model`. It sits at the bottom of the import layers so that SAE
code which runs per feature shard (a `shard_map`, e.g. the sparse TopK path) can ask which mesh
axis splits `d_sae` without naming it. `saejax.sharding` builds meshes and shardings from it.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

MESH_AXES = ("sae", "data", "model")

# The rules table: logical axis name -> mesh axis (None = replicated).
LOGICAL_RULES: dict[str, str | None] = {
    "member": "sae",  # the leading axis of a sweep's stacked states (saejax.sweep)
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


def mesh_axis(name: str) -> str | None:
    """The mesh axis the logical axis `name` is split over (None: replicated)."""
    return LOGICAL_RULES.get(name)


def logical_spec(names: tuple[str | None, ...] | None) -> P:
    """PartitionSpec for a tuple of logical axis names (None / unknown names -> replicated)."""
    if not names:
        return P()
    return P(*(LOGICAL_RULES.get(n) if n else None for n in names))
