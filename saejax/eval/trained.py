"""A trained SAE, from a run directory or a SAELens folder, as one object for evaluation.

Evaluation and analysis work on raw activations of the LM site, whatever the SAE trained on:
a run's input scale is folded into its parameters (`saejax.export.fold_input_scale`), exactly as
the SAELens export does, so a run and its export give the same features. Encoding and decoding
go through the family's own module (`saejax.sae`), so there is one copy of the SAE math.

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

from saejax.config import Config, SAEConfig
from saejax.export import CFG_FILENAME, fold_input_scale, load_saelens

# SAELens architecture names <-> saejax families.
FAMILY_OF_ARCHITECTURE = {"standard": "relu", "topk": "topk"}


@dataclass
class TrainedSAE:
    """Parameters for raw site activations plus where they came from."""

    params: dict[str, jax.Array]
    """W_enc [d_in, F], b_enc [F], W_dec [F, d_in], b_dec [d_in] (SAELens layout), float32."""
    arch: str
    """saejax family: "relu" or "topk"."""
    k: int | None
    """topk: active latents per token."""
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
    def d_in(self) -> int:
        return int(self.params["W_enc"].shape[0])

    @property
    def n_features(self) -> int:
        return int(self.params["W_enc"].shape[1])

    def _module(self, params):
        if self._graphdef is None:
            cfg = SAEConfig(arch=self.arch, d_in=self.d_in, n_features=self.n_features,
                            k=self.k or 1)
            from saejax.sae import make_sae  # noqa: PLC0415 (keeps this module light to import)

            self._graphdef = nnx.split(nnx.eval_shape(lambda: make_sae(cfg)))[0]
        return nnx.merge(self._graphdef, params)

    def encode(self, params: dict, x: jax.Array) -> jax.Array:
        """Feature activations [..., F] of raw activations x [..., d_in]."""
        lead = x.shape[:-1]
        f = self._module(params).encode(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        return f.reshape(*lead, -1)

    def decode(self, params: dict, f: jax.Array) -> jax.Array:
        return self._module(params).decode(f)

    def reconstruct(self, params: dict, x: jax.Array) -> jax.Array:
        return self.decode(params, self.encode(params, x)).astype(x.dtype)


def _jnp(params: dict) -> dict:
    return {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in params.items()}


def run_provenance(cfg: Config) -> tuple[str, str]:
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


def load_sae(path: str | Path) -> TrainedSAE:
    """A run directory (config.yaml + checkpoints/) or a SAELens folder (cfg.json + weights)."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        from saejax.export_run import load_run  # noqa: PLC0415 (pulls in the training stack)

        cfg, _, params, scale = load_run(path)
        lm_path, site = run_provenance(cfg)
        return TrainedSAE(_jnp(fold_input_scale(params, scale)), cfg.sae.arch,
                          cfg.sae.k if cfg.sae.arch == "topk" else None, site, lm_path,
                          path.name, str(path))
    if (path / CFG_FILENAME).is_file():
        params, cfg = load_saelens(path)
        arch = FAMILY_OF_ARCHITECTURE.get(cfg["architecture"])
        if arch is None:
            raise ValueError(f"{path / CFG_FILENAME}: architecture {cfg['architecture']!r} is not "
                             f"one of {sorted(FAMILY_OF_ARCHITECTURE)}")
        if cfg.get("normalize_activations", "none") != "none" or (
                arch == "topk" and cfg.get("rescale_acts_by_decoder_norm")):
            raise ValueError(f"{path / CFG_FILENAME}: normalize_activations / "
                             "rescale_acts_by_decoder_norm are not supported")
        meta = cfg.get("metadata") or {}
        return TrainedSAE(_jnp(params), arch, cfg.get("k") if arch == "topk" else None,
                          meta.get("hook_name") or "", meta.get("model_name") or "",
                          path.name, str(path))
    raise FileNotFoundError(f"{path} is neither a saejax run directory (config.yaml) nor a "
                            f"SAELens folder ({CFG_FILENAME})")
