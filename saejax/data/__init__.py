"""Activation sources (host-side) behind one interface, see `saejax.data.source`."""

from __future__ import annotations

from saejax.config import Config, ConfigError


def make_source(cfg: Config):
    """The activation source named by cfg.data, checked against sae.d_in."""
    d = cfg.data
    if d.source == "synthetic":
        from saejax.data.synthetic import SyntheticSource
        src = SyntheticSource(cfg.sae.d_in, d.n_true_features, p_active=d.p_active,
                              correlated_groups=d.correlated_groups, seed=d.seed)
    else:
        from saejax.data.npy import NpySource
        src = NpySource(d.paths, seed=d.seed)
    if src.d_in != cfg.sae.d_in:
        raise ConfigError(f"data gives vectors of width {src.d_in} but sae.d_in={cfg.sae.d_in}")
    return src
