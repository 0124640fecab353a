"""Activation store: LM activations harvested once to checksummed .npy shards, read shuffled.

This module is the format and its reader; `saejax.data.store_writer` writes stores.

Writing. `harvest_to_store` runs `activations_fn` (in real use a jitted LM forward returning
hook-site activations) over a token dataset's contexts and stores, per hook site, one row per
token position: contexts are flattened in order, and positions whose token is BOS are dropped
when `drop_bos` (their activations are large-norm outliers that would dominate an SAE's loss;
where BOS doubles as the document separator, as GPT-2's `<|endoftext|>` does, those positions
go too). Layout:

    out_dir/manifest.json                      written last, atomically: the store is complete
    out_dir/<site>/acts_00000.npy, ...         [rows_i, d_site] per shard
    out_dir/.incomplete                        while harvesting: the harvest's arguments (JSON)
    out_dir/progress.jsonl                     while harvesting: one line per finished shard

Shard i holds the rows of contexts [i*contexts_per_shard, (i+1)*contexts_per_shard) (the last
one fewer), for every site. float32 activations are stored as float32; bfloat16 as its raw
bits in uint16 (.npy has no bfloat16), the manifest saying "bfloat16"; readers get float32,
except training batches of a bfloat16 store (`rows`), which stay bfloat16 until the train step
widens them on the devices (`ShuffledTable.batch_dtype`).
The manifest records the sites and their widths, every shard's file, row count and sha256,
each shard's context range and the sha256 of its tokens, ctx_len, dtype, drop_bos/bos_id and
the caller's provenance (model, tokenizer, token dataset path and manifest hash, ...). A model
directory recorded with `model_relative` (its path from the store) is found again there when the
store and the model were moved together (`read_store_manifest`).

Reading. `ActivationStore(path, site, seed)` is an `ActivationSource` over one site: the shards
memory-mapped as one table, served in the per-epoch shuffled order of `saejax.data.npy`
(every row once per epoch, a pure function of (step, batch_size, seed), exact per-process
slices). Opening checks the manifest against the files (present, shape, dtype); `verify()`
also checks the sha256 of every shard of the site (it reads all the bytes).

Object stores. `out_dir` and `path` may be URLs (gs://, s3://): shards are uploaded as whole
objects, the progress file is rewritten rather than appended, the manifest is uploaded last, and
reading uses byte ranges instead of memory maps (`saejax.objstore`); resume works the same.
"""

from __future__ import annotations

import os
from typing import Any

import ml_dtypes
import numpy as np

from saejax.atomic import MANIFEST, open_shards, read_manifest_json, verify_shards
from saejax.data.npy import ShuffledTable
from saejax.paths import is_url

FORMAT = "saejax.activations"
VERSION = 1
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16)}
"""Store dtype -> dtype of the .npy files (bfloat16 as raw uint16 bits)."""


def _bfloat16_view(bits: np.ndarray) -> np.ndarray:
    """uint16 raw bits as bfloat16 (numpy's assignment into float32 converts exactly; into
    bfloat16 it copies)."""
    return bits.view(ml_dtypes.bfloat16)


class ActivationStore(ShuffledTable):
    """One hook site of a store written by `harvest_to_store`, as an `ActivationSource`.

    Rows are served in the per-epoch shuffled order of `saejax.data.npy` (seeded by `seed`), as
    float32, or bfloat16 for the training rows of a bfloat16 store (`batch_dtype`). `site` may
    be omitted when the store holds a single site."""

    def __init__(self, path: str | os.PathLike, site: str | None = None, seed: int = 0):
        self.path = os.fspath(path)
        self.manifest = read_store_manifest(self.path)
        m = self.manifest
        names = list(m["sites"])
        if site is None:
            if len(names) != 1:
                raise ValueError(f"{self.path} holds {len(names)} sites {names}: name one")
            site = names[0]
        if site not in m["sites"]:
            raise ValueError(f"{self.path} holds no site {site!r}; it holds {names}")
        self.site: str = site
        self.dtype: str = m["dtype"]
        self.ctx_len: int = m["ctx_len"]
        self.provenance: dict[str, Any] = m["provenance"]
        self._entries = m["sites"][site]["shards"]
        d = m["sites"][site]["d"]
        want = DTYPES[self.dtype]
        shards = open_shards(self.path, self._entries, want, d,
                             f"{self.dtype} (stored as {want.name})")
        total = sum(len(s) for s in shards)
        if total != m["n_rows"]:
            raise ValueError(f"{self.path}/{MANIFEST}: n_rows={m['n_rows']} but the shards of "
                             f"{site!r} hold {total} rows")
        bf16 = self.dtype == "bfloat16"
        super().__init__(shards, d, seed, decode=_bfloat16_view if bf16 else None,
                         batch_dtype=ml_dtypes.bfloat16 if bf16 else np.float32)

    def __repr__(self) -> str:
        return (f"ActivationStore({self.path!r}, site={self.site!r}, n_rows={self.n_rows}, "
                f"d_in={self.d_in}, dtype={self.dtype}, seed={self.seed})")

    def verify(self) -> None:
        """Check the sha256 of every shard of this site (error names the first bad shard)."""
        verify_shards(self.path, self._entries, "re-harvest the store")


def read_store_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the activation store at `path`, checked for the fields readers rely on."""
    path = os.fspath(path)
    file = os.path.join(path, MANIFEST)
    m = read_manifest_json(
        path, what="an activation store", fmt=FORMAT, version=VERSION,
        fields={"dtype": str, "n_rows": int, "ctx_len": int, "sites": dict, "shards": list,
                "provenance": dict},
        rerun_hint="a harvest was interrupted; re-run it with the same arguments to finish")
    if m["dtype"] not in DTYPES:
        raise ValueError(f"{file}: dtype {m['dtype']!r} is not one of {list(DTYPES)}")
    if not m["sites"]:
        raise ValueError(f"{file}: lists no sites")
    for site, info in m["sites"].items():
        if not (isinstance(info, dict) and isinstance(info.get("d"), int)
                and isinstance(info.get("shards"), list)):
            raise ValueError(f"{file}: sites[{site!r}] needs d and shards")
        for i, s in enumerate(info["shards"]):
            if not (isinstance(s, dict) and isinstance(s.get("file"), str)
                    and isinstance(s.get("rows"), int) and isinstance(s.get("sha256"), str)):
                raise ValueError(f"{file}: sites[{site!r}].shards[{i}] needs file, rows, sha256")
            parts = s["file"].split("/")
            if os.path.isabs(s["file"]) or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"{file}: sites[{site!r}].shards[{i}] file {s['file']!r} must "
                                 f"be a relative path inside the store")
    _relocate_provenance(m, path)
    return m


def _relocate_provenance(m: dict[str, Any], path: str) -> None:
    """Point provenance.model at the model directory where it is now, when the store was moved
    together with it: a recorded path that no longer exists is replaced by the same place
    relative to the store (`model_relative`), if something is there. A store or a model at a
    URL is never relocated."""
    prov = m["provenance"]
    model, relative = prov.get("model"), prov.get("model_relative")
    if is_url(path) or is_url(model):
        return
    if isinstance(model, str) and isinstance(relative, str) and not os.path.exists(model):
        moved = os.path.normpath(os.path.join(os.path.abspath(path), relative))
        if os.path.isdir(moved):
            prov["model"] = moved
