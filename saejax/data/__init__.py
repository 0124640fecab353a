"""Activation sources behind one interface: host-side sources (`saejax.data.source`) and the
on-the-fly feed, both served to the training loop as a `saejax.data.provider.BatchProvider`;
and the data paths a run records (`with_absolute_paths`) and finds again (`relocated`)."""

from __future__ import annotations

import dataclasses
import os

from saejax.config import Config, ConfigError
from saejax.files import absolute_path, resolve_data_path


def make_provider(cfg: Config, mesh):
    """The training loop's batch provider for cfg.data: the on-the-fly feed for source=lm (LM
    activations computed on the devices), else the host-side source read per process."""
    if cfg.data.source == "lm":
        from saejax.data.onthefly import make_feed
        return make_feed(cfg, mesh)
    from saejax.data.provider import HostProvider
    return HostProvider(make_source(cfg), mesh, cfg.train.batch_size)


def make_source(cfg: Config):
    """The activation source named by cfg.data, checked against sae.d_in.

    A source that cannot be opened (missing file, damaged manifest, unknown site) is a config
    error naming the data field, so the CLI reports it before any compute."""
    d = cfg.data
    try:
        if d.source == "synthetic":
            from saejax.data.synthetic import SyntheticSource
            src = SyntheticSource(cfg.sae.d_in, d.n_true_features, p_active=d.p_active,
                                  correlated_groups=d.correlated_groups, seed=d.seed)
        elif d.source == "lm":  # computed on the devices: needs the mesh
            raise ConfigError("it is computed on the devices, not a host-side source: use "
                              "saejax.data.make_provider(cfg, mesh)")
        elif d.source == "store":
            from saejax.data.store import ActivationStore
            src = ActivationStore(d.store_path, d.site or None, seed=d.seed)
        else:
            from saejax.data.npy import NpySource
            src = NpySource(d.paths, seed=d.seed)
    except ValueError as e:
        raise ConfigError(f"data.source={d.source}: {e}") from e
    if src.d_in != cfg.sae.d_in:
        raise ConfigError(f"data gives vectors of width {src.d_in} but sae.d_in={cfg.sae.d_in}")
    return src


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with its data paths and run_dir absolute (lm_path only when it is a local
    directory, not a hub id): what a run records, so that its directory does not depend on the
    directory the command ran in."""
    d = cfg.data
    lm_path = absolute_path(d.lm_path) if os.path.isdir(d.lm_path) else d.lm_path
    data = dataclasses.replace(d, store_path=absolute_path(d.store_path),
                               tokens_path=absolute_path(d.tokens_path), lm_path=lm_path,
                               paths=[absolute_path(p) for p in d.paths])
    train = dataclasses.replace(cfg.train, run_dir=absolute_path(cfg.train.run_dir))
    return dataclasses.replace(cfg, data=data, train=train)


def relocated(cfg: Config, run_dir: str | os.PathLike) -> Config:
    """A run's recorded config (config.yaml) as seen from where its directory is now: a data path
    that no longer exists is looked for at the same place relative to `run_dir`
    (`saejax.files.resolve_data_path`), so a run moved together with its data still works from
    any directory; train.run_dir becomes `run_dir`."""
    d, recorded = cfg.data, cfg.train.run_dir

    def find(path: str) -> str:
        return resolve_data_path(path, recorded, run_dir)

    data = dataclasses.replace(d, store_path=find(d.store_path), tokens_path=find(d.tokens_path),
                               lm_path=find(d.lm_path), paths=[find(p) for p in d.paths])
    train = dataclasses.replace(cfg.train, run_dir=absolute_path(os.fspath(run_dir)))
    return dataclasses.replace(cfg, data=data, train=train)
