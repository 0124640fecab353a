"""A training run's directory, read back for inference: its config, its newest verified
parameters (and nothing of the optimizer), and where its activations came from.

    run = load_params("runs/sae")                 # params laid out over all local devices,
    run.params["W_dec"].sharding                  #   features over the `model` axis
    lm_path, site = provenance(run.cfg)

Only what inference needs is read from the checkpoint (parameters, input scale, the family's
state), straight onto the mesh given, so a dictionary that trained feature-sharded because it
did not fit one device is exported and evaluated without ever being whole on one device, and
its Adam moments are never read at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from saejax import sharding
from saejax.checkpoint import Checkpointer
from saejax.config import Config, MeshConfig, from_dict
from saejax.data import relocated
from saejax.errors import ConfigError
from saejax.paths import as_path
from saejax.typedconfig import read_yaml
from saejax.sae import SAEConfig, get_family
from saejax.sweep import FILENAME as SWEEP_FILE, read_sweep, split_member


@dataclass
class RunParams:
    cfg: Config
    """The run's config (config.yaml)."""
    step: int
    """The checkpoint's step."""
    params: dict[str, jax.Array]
    """The SAE's parameters as trained (on inputs × input_scale), laid out on the mesh given."""
    input_scale: float
    """Inputs were multiplied by this before the SAE (fold it in for raw activations)."""
    family_state: dict[str, jax.Array]
    """The family's non-parameter state (`Family.init_state`)."""

    def for_inference(self) -> tuple[SAEConfig, dict[str, jax.Array]]:
        """(SAE config, params) as the SAE is evaluated and exported (`Family.inference`: e.g.
        a BatchTopK run becomes the JumpReLU its threshold defines); still on inputs × scale."""
        return get_family(self.cfg.sae.arch).for_inference(self.cfg.sae, self.params,
                                                          self.family_state)


def is_run(spec: str | Path) -> bool:
    """Whether `spec` names a training run: a run directory, or `RUN:member` of a sweep."""
    return (split_member(spec)[0] / "config.yaml").is_file()


def read_config(spec: str | Path) -> Config:
    """The config a run was started with (a sweep member's for `RUN:member`), or a ConfigError
    naming what is missing or wrong."""
    run_dir, member = split_member(spec)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a saejax run directory (no config.yaml)")
    tree = read_yaml(path, "the run's config")
    if "sae" not in tree and "model" in tree:
        raise ConfigError(f"{run_dir} is a language-model run (train-lm), not an SAE run")
    base = relocated(from_dict(Config, tree), run_dir)
    sweep = read_sweep(run_dir, base)  # None: a single SAE's run
    if sweep is None:
        if member is not None:
            raise ConfigError(f"{run_dir} is a single SAE's run, not a sweep: no member {member}")
        return base
    if member is None:
        raise ConfigError(f"{run_dir} is a sweep of {len(sweep.members)} members: name one as "
                          f"{run_dir}:MEMBER (e.g. {run_dir}:{sweep.members[0].name})")
    return sweep.member(member).cfg


def _sweep(run_dir: Path):
    """The sweep recorded in a run directory (`saejax.sweep.Sweep`), or None."""
    base = relocated(from_dict(Config, read_yaml(run_dir / "config.yaml", "the run's config")),
                     run_dir)
    return read_sweep(run_dir, base)


def members(run_dir: str | Path) -> list[str]:
    """`RUN:member` of every member of a sweep run, or [run_dir] for any other path."""
    run_dir = as_path(run_dir)
    if not (run_dir / SWEEP_FILE).is_file() or split_member(run_dir)[1] is not None:
        return [str(run_dir)]  # not a sweep (checked as the command goes on) or one member
    return [f"{run_dir}:{m.name}" for m in _sweep(run_dir).members]


def inference_mesh(n_features: int, devices: list | None = None) -> Mesh:
    """All local devices (or `devices`) on the `model` axis, so the features are sharded; as many
    of them as divide n_features."""
    devices = jax.local_devices() if devices is None else list(devices)
    n = max(m for m in range(1, len(devices) + 1) if n_features % m == 0)
    return sharding.make_mesh(MeshConfig(data=1, model=n), devices[:n])


def _abstract(cfg: Config, mesh: Mesh) -> dict:
    """The restore target: shapes and shardings of what inference reads from a checkpoint."""
    family = get_family(cfg.sae.arch)
    params = nnx.to_pure_dict(nnx.eval_shape(lambda: nnx.split(family.make(cfg.sae))[1]))
    state = jax.eval_shape(lambda: family.init_state(cfg.sae))

    def target(tree: dict, axes: dict) -> dict:
        return sharding.abstract(tree, {k: sharding.named(mesh, axes.get(k)) for k in tree})

    scale = jax.ShapeDtypeStruct((), jax.numpy.float32)
    return {"params": target(params, family.param_axes),
            "input_scale": sharding.abstract(scale, sharding.replicated(mesh)),
            "family_state": target(state, family.state_axes)}


def load_params(spec: str | Path, mesh: Mesh | None = None) -> RunParams:
    """The newest checkpoint of a run (or of `RUN:member`, a sweep member) that restores and
    verifies, parameters only, laid out on `mesh` (default: `inference_mesh`)."""
    run_dir, member = split_member(spec)
    cfg = read_config(spec)
    mesh = inference_mesh(cfg.sae.n_features) if mesh is None else mesh
    target = _abstract(cfg, mesh)
    if member is not None:  # its group's stacked arrays, then its own slice of them
        group, index, size = _member_position(run_dir, member)
        target = {group: jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            (size, *a.shape), a.dtype, sharding=sharding.over_members(a.sharding)), target)}
    restored = Checkpointer(run_dir / "checkpoints", read_only=True).restore_latest(
        target, partial=True)
    if restored is None:
        raise ConfigError(f"{run_dir / 'checkpoints'} holds no checkpoint")
    step, state, _ = restored
    if member is not None:
        state = jax.jit(lambda s: jax.tree.map(lambda x: x[index], s),
                        out_shardings=jax.tree.map(lambda a: a.sharding, _abstract(cfg, mesh))
                        )(state[group])
    return RunParams(cfg, step, state["params"], float(state["input_scale"]),
                     state["family_state"])


def _member_position(run_dir: Path, member: str) -> tuple[str, int, int]:
    """(group key, index in the group, group size) of a sweep member."""
    for group in _sweep(run_dir).groups:
        names = [m.name for m in group.members]
        if member in names:
            return group.name, names.index(member), len(names)
    raise ConfigError(f"{run_dir}: no sweep member {member}")


def provenance(cfg: Config) -> tuple[str, str]:
    """(lm_path, site) a run's activations came from, read from its config or its store."""
    data = cfg.data
    if data.source == "lm":
        return data.lm_path, data.site
    if data.source == "store":
        from saejax.data.store import read_store_manifest  # noqa: PLC0415

        m = read_store_manifest(data.store_path)
        sites = list(m["sites"])
        return str(m["provenance"].get("model", "")), data.site or (sites[0] if sites else "")
    return "", ""
