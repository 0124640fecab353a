"""A trained SAE, from a run directory or a SAELens folder, as one object for evaluation.

Evaluation and analysis work on raw activations of the LM site, whatever the SAE trained on:
a run's input scale is folded into its parameters (the family's `fold_input_scale`), exactly as
the SAELens export does, so a run and its export give the same features. Encoding, decoding and
firing go through the family's own module (`saejax.sae`), so there is one copy of the SAE math.
Only parameters are read, laid out over all local devices with the features sharded (or on the
mesh given), never the optimizer state.

    sae = load_sae("runs/sae")                  # or an exported folder
    f = sae.encode(sae.params, x)               # jnp, jit-friendly: params are an argument
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from saejax import sharding
from saejax.config import from_dict
from saejax.export import CFG_FILENAME, load_saelens
from saejax.paths import as_path
from saejax.runs import inference_mesh, is_run, load_params, provenance
from saejax.sae import family_for_saelens, get_family
from saejax.sae.config import SAEConfig


@dataclass
class TrainedSAE:
    """Parameters for raw site activations plus where they came from."""

    params: dict[str, jax.Array]
    """The family's parameters (SAELens layout), float32, for raw activations."""
    cfg: SAEConfig
    """The SAE's config: family (`arch`), sizes and the family's options."""
    site: str
    """Hook site the SAE reads (e.g. blocks.0.mlp.hook_post); "" when unknown."""
    lm_path: str
    """The LM the activations came from (HF directory or hub id); "" when unknown."""
    name: str
    """A short label for tables and file names (the folder's name)."""
    source: str = ""
    """The directory it was loaded from."""
    _graphdef: object = field(default=None, repr=False)

    @property
    def arch(self) -> str:
        return self.cfg.arch

    @property
    def k(self) -> int | None:
        """topk: active latents per token (None for other families)."""
        return self.cfg.topk.k if self.cfg.arch == "topk" else None

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    def _module(self, params):
        if self._graphdef is None:
            family = get_family(self.cfg.arch)
            self._graphdef = family.graphdef(self.cfg)
        return nnx.merge(self._graphdef, params)

    def encode(self, params: dict, x: jax.Array) -> jax.Array:
        """Feature activations [..., F] of raw activations x [..., d_in]."""
        lead = x.shape[:-1]
        f = self._module(params).encode(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        return f.reshape(*lead, -1)

    def decode(self, params: dict, f: jax.Array) -> jax.Array:
        return self._module(params).decode(f)

    def fired(self, params: dict, f: jax.Array) -> jax.Array:
        """bool [..., F]: where features fire, by the family's rule."""
        return self._module(params).fired(f)


def _place(params: dict, arch: str, mesh: Mesh) -> dict:
    """float32 params laid out on `mesh` by the family's logical axes."""
    axes = get_family(arch).param_axes
    return {k: jax.device_put(np.asarray(v, np.float32), sharding.named(mesh, axes[k]))
            for k, v in params.items()}


def _from_run(path: Path, mesh: Mesh | None) -> TrainedSAE:
    run = load_params(path, mesh)
    sae_cfg, params = run.for_inference()
    family = get_family(sae_cfg.arch)
    scale = run.input_scale
    params = params if scale == 1.0 else jax.jit(
        lambda p: family.fold_input_scale(p, scale))(params)
    lm_path, site = provenance(run.cfg)
    return TrainedSAE(params, sae_cfg, site, lm_path, path.name, str(path))


def _from_saelens(path: Path, mesh: Mesh | None) -> TrainedSAE:
    params, cfg_json = load_saelens(path)
    where = path / CFG_FILENAME
    family = family_for_saelens(cfg_json["architecture"])
    if cfg_json.get("normalize_activations", "none") != "none":
        raise ValueError(f"{where}: normalize_activations="
                         f"{cfg_json['normalize_activations']!r} is not supported")
    try:
        options = family.from_saelens(cfg_json)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}: {e}") from None
    cfg = from_dict(SAEConfig, {"arch": family.name, "d_in": int(cfg_json["d_in"]),
                                "n_features": int(cfg_json["d_sae"]), **options})
    mesh = inference_mesh(cfg.n_features) if mesh is None else mesh
    meta = cfg_json.get("metadata") or {}
    return TrainedSAE(_place(params, family.name, mesh), cfg, meta.get("hook_name") or "",
                      meta.get("model_name") or "", path.name, str(path))


def load_sae(path: str | Path, mesh: Mesh | None = None) -> TrainedSAE:
    """A run directory (config.yaml + checkpoints/), a sweep member (`RUN:member`) or a SAELens
    folder (cfg.json + weights), its parameters laid out on `mesh` (default: all local devices,
    features sharded)."""
    path = as_path(path)
    if is_run(path):
        return _from_run(path, mesh)
    if (path / CFG_FILENAME).is_file():
        return _from_saelens(path, mesh)
    raise FileNotFoundError(f"{path} is neither a saejax run directory (config.yaml) nor a "
                            f"SAELens folder ({CFG_FILENAME})")

