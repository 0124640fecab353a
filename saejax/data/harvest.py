"""Harvest a language model's activations over a token dataset into an activation store.

The one place where the LM side meets the store: load the model (`saejax.lm.load_lm`), check the
sites, compile the early-stopping capture forward (`saejax.lm.cache_fn`) and hand it to
`saejax.data.store_writer.harvest_to_store`, which shards, checksums and resumes.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax.numpy as jnp

from saejax.config import ConfigError
from saejax.files import absolute_path
from saejax.paths import is_url


def check_sites(sites: Sequence[str], valid: Sequence[str]) -> None:
    """Reject unknown hook sites, listing the valid ones."""
    if not sites:
        raise ConfigError(f"name at least one hook site; valid sites: {', '.join(valid)}")
    unknown = [s for s in sites if s not in valid]
    if unknown:
        raise ConfigError(f"unknown hook site {unknown[0]!r}; valid sites: {', '.join(valid)}")


def _model_paths(model: str, out_dir: str) -> dict[str, str]:
    """How a store records its model: a local directory absolute (eval finds it from any
    directory) and relative to the store (found again when both were moved together, see
    `saejax.data.store.read_store_manifest`); a hub id as given. A store in a bucket records
    the model's absolute path only: a bucket and a local directory do not move together."""
    if not os.path.isdir(model):
        return {"model": model}
    if is_url(out_dir):
        return {"model": absolute_path(model)}
    return {"model": absolute_path(model),
            "model_relative": os.path.relpath(absolute_path(model), absolute_path(out_dir))}


def harvested_contexts(n_contexts: int, max_contexts: int | None, holdout: int) -> int:
    """How many leading contexts of a dataset of n_contexts a harvest takes (errors name the
    option at fault)."""
    if max_contexts is not None and max_contexts < 1:
        raise ConfigError(f"max_contexts must be >= 1, got {max_contexts}")
    if not 0 <= holdout < n_contexts:
        raise ConfigError(f"holdout must be in [0, {n_contexts}) (the token dataset has "
                          f"{n_contexts} contexts), got {holdout}")
    return min(n_contexts - holdout, n_contexts if max_contexts is None else max_contexts)


class FirstContexts:
    """The first n contexts of a token dataset, as the store's writer reads them."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, n
        self.path, self.ctx_len, self.bos_id = dataset.path, dataset.ctx_len, dataset.bos_id

    def __len__(self) -> int:
        return self.n

    def take(self, indices):
        return self.dataset.take(indices)


def harvest(lm_path: str | os.PathLike, tokens_path: str | os.PathLike,
            out_dir: str | os.PathLike, sites: Sequence[str], *, contexts_per_shard: int = 1024,
            batch_contexts: int = 32, dtype: str = "float32", drop_bos: bool = True,
            max_contexts: int | None = None, holdout: int = 0, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Run the LM at `lm_path` over every context of the token dataset at `tokens_path` and store
    the activations at `sites` in `out_dir`: its first `max_contexts` contexts if given, and never
    its last `holdout` ones (left for `saejax eval`/`analyze`, which default to the contexts after
    the harvested ones); returns the store manifest. Re-running after an interruption continues
    where it stopped."""
    from saejax.data.store_writer import harvest_to_store
    from saejax.lm import cache_fn, load_lm
    from saejax.text.tokens import TokenDataset

    try:
        lm = load_lm(lm_path)
        tokens = TokenDataset(tokens_path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    check_sites(sites, lm.hook_names())
    n = harvested_contexts(len(tokens), max_contexts, holdout)
    if tokens.manifest["tokenizer"].get("vocab_size", 0) > lm.cfg.vocab_size:
        raise ConfigError(f"token dataset {tokens_path} has vocabulary "
                          f"{tokens.manifest['tokenizer']['vocab_size']} but the model at "
                          f"{lm_path} has {lm.cfg.vocab_size}")
    forward, state = cache_fn(lm, sites)
    provenance = {**_model_paths(os.fspath(lm_path), os.fspath(out_dir)),
                  "model_type": lm.cfg.model_type, "tokenizer": tokens.manifest["tokenizer"]}
    if n < len(tokens):
        tokens = FirstContexts(tokens, n)
        provenance["contexts"] = f"the first {n}"
    return harvest_to_store(
        tokens, lambda t: forward(state, jnp.asarray(t))[1], out_dir, sites=list(sites),
        contexts_per_shard=contexts_per_shard, batch_contexts=batch_contexts, dtype=dtype,
        drop_bos=drop_bos, provenance=provenance, overwrite=overwrite, progress=progress)
