"""Export a training run's newest checkpoint in SAELens's on-disk format."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import yaml

from saejax.checkpoint import Checkpointer
from saejax.config import Config, ConfigError, MeshConfig, from_dict
from saejax.export import export_saelens
from saejax.sharding import make_mesh
from saejax.train.step import StepContract

ARCHITECTURES = {"relu": "standard", "topk": "topk"}


def load_run(run_dir: str | Path) -> tuple[Config, int, dict, float]:
    """(config, step, params as numpy, input scale) of a run's newest good checkpoint."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} is not a saejax run directory (no config.yaml)")
    cfg = from_dict(Config, yaml.safe_load(cfg_path.read_text()))
    cfg.mesh = MeshConfig(data=1, model=1)  # restore onto one device, whatever it trained on
    contract = StepContract.build(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    restored = Checkpointer(run_dir / "checkpoints", async_save=False).restore_latest(
        contract.abstract_state())
    if restored is None:
        raise ConfigError(f"{run_dir / 'checkpoints'} holds no checkpoint")
    step, state, _ = restored
    params = {k: np.asarray(v) for k, v in jax.device_get(state.params).items()}
    return cfg, step, params, float(state.input_scale)


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    from saejax.eval.trained import run_provenance  # noqa: PLC0415

    cfg, step, params, scale = load_run(run_dir)
    lm_path, site = run_provenance(cfg)
    return export_saelens(
        out_dir, params, architecture=ARCHITECTURES[cfg.sae.arch],
        k=cfg.sae.k if cfg.sae.arch == "topk" else None, input_scale=scale,
        metadata={"saejax_run": str(Path(run_dir).resolve()), "saejax_step": step,
                  "dataset_path": cfg.data.source, "model_name": lm_path or None,
                  "hook_name": site or None},
    )
