"""Activation sources behind one interface: host-side sources (`saejax.data.source`) and the
on-the-fly feed, both served to the training loop as a `saejax.data.provider.BatchProvider`."""

from __future__ import annotations

from saejax.config import Config, ConfigError


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
