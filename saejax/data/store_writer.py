"""Writing activation stores (layout and reader: `saejax.data.store`).

Harvesting is resumable, because the shard boundaries depend on the arguments only. Every
shard file is written tmp + fsync + rename, and when all sites' files of shard i are in
place a line recording them (sizes, checksums) is appended to progress.jsonl. Re-run with the
same arguments on an interrupted directory, the writer checks the recorded shards (files
present with the recorded size and shape, tokens unchanged), deletes anything written after
the last record, and continues with the next shard: no gaps, no duplicates, and the finished
store is byte-identical to an uninterrupted harvest (given a deterministic `activations_fn`).
Re-run with different arguments, it refuses and names what differs (`overwrite=True` starts
over). A complete store is left alone when the arguments match (nothing to do) and refused
otherwise, unless `overwrite=True`, which removes the manifest first.

Into a bucket (`out_dir` a gs:// or s3:// URL) the same rules hold with the object store's
means: a shard file is one upload (an object appears whole or not at all, so there are no tmp
files), progress.jsonl is rewritten with each new line (no append), the marker and the manifest
are objects, and resuming checks the recorded shards' sizes and .npy headers by ranged reads.

Batches. Contexts go to `activations_fn` `batch_contexts` at a time, batches aligned to the
shard start; a shard's last, short batch is padded with token-0 contexts whose outputs are
discarded, so a jitted forward compiles for one shape only. The next batch is dispatched
before the previous one is copied to the host, which overlaps an accelerator's forward with
the host's conversion and writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

from saejax.atomic import MANIFEST, MARKER, sha256_file, write_json_atomic, write_npy_atomic
from saejax.data.store import DTYPES, FORMAT, VERSION, read_store_manifest
from saejax.objstore import is_link, list_names, makedirs, open_npys, remove_tree, size
from saejax.paths import absolute, append_text, as_path, is_url

PROGRESS = "progress.jsonl"

_SITE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_SHARD = re.compile(r"acts_(\d{5,})\.npy(\.tmp)?\Z")
_WORK_FILES = {MANIFEST, MANIFEST + ".tmp", MARKER, MARKER + ".tmp", PROGRESS}
# The arguments that determine a store's bytes: a resumed harvest must match them exactly.
_SPEC_KEYS = ("format", "version", "sites", "n_contexts", "ctx_len", "contexts_per_shard",
              "batch_contexts", "dtype", "drop_bos", "bos_id", "provenance")

ActivationsFn = Callable[[np.ndarray], Mapping[str, Any]]


def harvest_to_store(contexts, activations_fn: ActivationsFn, out_dir: str | os.PathLike, *,
                     sites: Sequence[str], contexts_per_shard: int = 1024,
                     batch_contexts: int = 32, dtype: str = "float32", drop_bos: bool = True,
                     bos_id: int | None = None, provenance: Mapping[str, Any] | None = None,
                     overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Harvest `activations_fn` over all of `contexts` into a store at `out_dir` (layout and
    resume rules in the module docstring); return the manifest.

    contexts: len() and take(indices) -> int [n, ctx_len] (a `TokenDataset`), or an int array
        [N, ctx_len].
    activations_fn(tokens int32 [batch_contexts, ctx_len]) -> {site: [batch_contexts, ctx_len,
        d_site]} (numpy or jax arrays, any float dtype); extra keys are ignored.
    dtype: "float32" or "bfloat16" (stored as uint16 bits; read back as float32).
    drop_bos / bos_id: drop positions whose token is bos_id (default: contexts.bos_id).
    provenance: JSON-serializable description (model, tokenizer, ...). When `contexts` is a
        directory-backed dataset (has `.path` with a manifest.json), a "tokens" entry with its
        path and manifest sha256 is added unless the caller gives one.
    Memory: one shard per site is assembled in memory before it is written,
    contexts_per_shard x ctx_len x d x (4 or 2) bytes per site; fewer, larger shards make
    reading cheaper (a batch costs a few microseconds per shard it touches).
    """
    out_dir = os.fspath(out_dir)
    spec = _harvest_spec(contexts, sites, contexts_per_shard, batch_contexts, dtype, drop_bos,
                         bos_id, provenance)
    existing = _prepare(out_dir, spec, overwrite)
    if existing is not None:
        return existing
    records = _resume(out_dir, spec, contexts)

    n, cps = spec["n_contexts"], contexts_per_shard
    n_shards = -(-n // cps)
    widths = dict(records[0]["d"]) if records else {}
    bar = _progress_bar(progress, n, sum(r["contexts"][1] - r["contexts"][0] for r in records))
    for i in range(len(records), n_shards):
        a, b = i * cps, min((i + 1) * cps, n)
        tokens = _take(contexts, np.arange(a, b), spec["ctx_len"])
        blocks = _harvest_shard(tokens, activations_fn, spec, widths, i)
        record = {"index": i, "contexts": [a, b], "rows": 0,
                  "tokens_sha256": _tokens_sha256(tokens), "d": {}, "files": {}}
        for site in spec["sites"]:
            file = f"{site}/acts_{i:05d}.npy"
            path = os.path.join(out_dir, file)
            makedirs(os.path.dirname(path))
            sha = write_npy_atomic(path, blocks[site])
            record["rows"] = int(len(blocks[site]))
            record["d"][site] = int(blocks[site].shape[1])
            record["files"][site] = {"file": file, "sha256": sha, "bytes": size(path)}
        _append_line(os.path.join(out_dir, PROGRESS), record)
        records.append(record)
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()

    manifest = _manifest(spec, records)
    if manifest["n_rows"] == 0:
        raise ValueError(f"{out_dir}: every position of every context is BOS; the store would "
                         f"hold no rows (use drop_bos=False?)")
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    as_path(os.path.join(out_dir, PROGRESS)).unlink()
    as_path(os.path.join(out_dir, MARKER)).unlink()
    return manifest


def token_provenance(contexts) -> dict[str, Any] | None:
    """{"path", "manifest_sha256"} of a directory-backed token dataset, else None."""
    path = getattr(contexts, "path", None)
    if not isinstance(path, (str, os.PathLike)):
        return None
    manifest = os.path.join(os.fspath(path), MANIFEST)
    if not as_path(manifest).is_file():
        return None
    return {"path": absolute(os.fspath(path)), "manifest_sha256": sha256_file(manifest)}


def _harvest_spec(contexts, sites, contexts_per_shard, batch_contexts, dtype, drop_bos, bos_id,
                  provenance) -> dict[str, Any]:
    """The arguments that determine the store's bytes, checked, as canonical JSON values."""
    if isinstance(sites, str) or not sites:
        raise ValueError(f"sites must be a non-empty list of hook-site names, got {sites!r}")
    sites = list(sites)
    for site in sites:
        if not isinstance(site, str) or not _SITE.match(site) or site in _WORK_FILES:
            raise ValueError(f"site name {site!r} cannot name a directory of the store (letters, "
                             f"digits, '_', '.', '-'; not starting with '.')")
    if len(set(sites)) != len(sites):
        raise ValueError(f"sites lists a site twice: {sites}")
    if contexts_per_shard < 1:
        raise ValueError(f"contexts_per_shard must be >= 1, got {contexts_per_shard}")
    if batch_contexts < 1:
        raise ValueError(f"batch_contexts must be >= 1, got {batch_contexts}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    n = len(contexts)
    if n < 1:
        raise ValueError("contexts is empty: nothing to harvest")
    ctx_len = getattr(contexts, "ctx_len", None)
    if not isinstance(ctx_len, int):
        ctx_len = int(_take(contexts, np.arange(1), None).shape[1])
    if drop_bos:
        if bos_id is None:
            bos_id = getattr(contexts, "bos_id", None)
        if bos_id is None:
            raise ValueError("drop_bos=True needs bos_id (the contexts carry no bos_id); pass "
                             "bos_id, or drop_bos=False")
    prov = dict(provenance or {})
    if "tokens" not in prov:
        tokens = token_provenance(contexts)
        if tokens is not None:
            prov["tokens"] = tokens
    spec = {"format": FORMAT, "version": VERSION, "sites": sites, "n_contexts": int(n),
            "ctx_len": int(ctx_len), "contexts_per_shard": int(contexts_per_shard),
            "batch_contexts": int(batch_contexts), "dtype": dtype, "drop_bos": bool(drop_bos),
            "bos_id": None if bos_id is None else int(bos_id), "provenance": prov}
    try:
        return json.loads(json.dumps(spec, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"provenance must be JSON-serializable ({e})") from e


def _take(contexts, idx: np.ndarray, ctx_len: int | None) -> np.ndarray:
    """Contexts idx as int32 [len(idx), ctx_len] (ndarray.take would flatten: index instead)."""
    if isinstance(contexts, np.ndarray):
        tokens = contexts[idx]
    else:
        tokens = contexts.take(idx)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or len(tokens) != len(idx) or (ctx_len and tokens.shape[1] != ctx_len):
        raise ValueError(f"contexts gave shape {tokens.shape} for {len(idx)} contexts; expected "
                         f"[{len(idx)}, {ctx_len or 'ctx_len'}]")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"contexts must hold integer token ids, got dtype {tokens.dtype}")
    return tokens.astype(np.int32, copy=False)


def _tokens_sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, "<i4").tobytes()).hexdigest()


def _harvest_shard(tokens: np.ndarray, activations_fn: ActivationsFn, spec: dict[str, Any],
                   widths: dict[str, int], index: int) -> dict[str, np.ndarray]:
    """The stored rows [rows, d] of one shard, per site (storage dtype). Batch k+1 is
    dispatched before batch k is copied to the host (overlap with an async jitted forward)."""
    bc, ctx_len = spec["batch_contexts"], spec["ctx_len"]
    keep = (tokens != spec["bos_id"]) if spec["drop_bos"] else np.ones(tokens.shape, bool)
    n_rows = int(keep.sum())
    store_dtype = spec["dtype"]
    out: dict[str, np.ndarray] = {}
    row = 0

    def call(k: int):
        batch = tokens[k:k + bc]
        if len(batch) < bc:  # the shard's last batch: pad, so the forward has one shape
            batch = np.concatenate([batch, np.zeros((bc - len(batch), ctx_len), np.int32)])
        return activations_fn(batch)

    def consume(k: int, acts: Mapping[str, Any]) -> None:
        nonlocal row
        m = min(bc, len(tokens) - k)
        mask = keep[k:k + m].reshape(-1)
        for site in spec["sites"]:
            if site not in acts:
                raise ValueError(f"activations_fn returned no {site!r} (it gave {sorted(acts)})")
            x = np.asarray(acts[site])
            if x.ndim != 3 or x.shape[:2] != (bc, ctx_len):
                raise ValueError(f"activations_fn gave {site!r} of shape {x.shape}; expected "
                                 f"[{bc}, {ctx_len}, d] for tokens [{bc}, {ctx_len}]")
            d = int(x.shape[2])
            if widths.setdefault(site, d) != d:
                raise ValueError(f"activations_fn gave {site!r} of width {d}, earlier shards "
                                 f"have width {widths[site]}")
            x = x[:m].reshape(m * ctx_len, d)[mask]
            if x.dtype.kind != "f" and x.dtype != ml_dtypes.bfloat16:
                raise ValueError(f"activations_fn gave {site!r} of dtype {x.dtype}, not floats")
            if not np.isfinite(x).all():
                raise ValueError(f"activations_fn gave non-finite values for {site!r} in shard "
                                 f"{index}, contexts {k}..{k + m - 1} of the shard")
            if site not in out:
                out[site] = np.empty((n_rows, d), DTYPES[store_dtype])
            out[site][row:row + len(x)] = _encode(x, store_dtype)
        row += int(mask.sum())

    pending = (0, call(0))
    for k in range(bc, len(tokens), bc):
        ahead = (k, call(k))
        consume(*pending)
        pending = ahead
    consume(*pending)
    return out


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """Activations in their storage dtype (bfloat16: round to nearest even, keep the bits)."""
    if dtype == "bfloat16":
        return x.astype(ml_dtypes.bfloat16, copy=False).view(np.uint16)
    return x.astype(np.float32, copy=False)


def _append_line(path: str, record: dict[str, Any]) -> None:
    if is_url(path):  # rewritten whole: an object cannot be appended to
        append_text(path, json.dumps(record, sort_keys=True) + "\n")
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _manifest(spec: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    sites = {site: {"d": records[0]["d"][site],
                    "shards": [{"file": r["files"][site]["file"], "rows": r["rows"],
                                "sha256": r["files"][site]["sha256"]} for r in records]}
             for site in spec["sites"]}
    return {"format": FORMAT, "version": VERSION,
            "dtype": spec["dtype"], "storage_dtype": DTYPES[spec["dtype"]].name,
            "n_rows": sum(r["rows"] for r in records),
            "n_contexts": spec["n_contexts"], "ctx_len": spec["ctx_len"],
            "contexts_per_shard": spec["contexts_per_shard"],
            "batch_contexts": spec["batch_contexts"],
            "drop_bos": spec["drop_bos"], "bos_id": spec["bos_id"],
            "provenance": spec["provenance"],
            "sites": sites,
            "shards": [{"contexts": r["contexts"], "rows": r["rows"],
                        "tokens_sha256": r["tokens_sha256"]} for r in records]}


def _spec_of_manifest(m: dict[str, Any]) -> dict[str, Any]:
    spec = {k: m.get(k) for k in _SPEC_KEYS}
    spec["sites"] = list(m.get("sites") or {})
    return spec


def _spec_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in _SPEC_KEYS if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


# -- the output directory: fresh, resumed, complete ---------------------------------------------


def _ours(out_dir: str) -> tuple[set[str], list[str]]:
    """(top-level names the store writer owns, foreign entries) of an existing out_dir."""
    ours, foreign = set(), []
    for name in sorted(list_names(out_dir)):
        path = os.path.join(out_dir, name)
        if name in _WORK_FILES:
            ours.add(name)
        elif as_path(path).is_dir() and _SITE.match(name) and not is_link(path):
            bad = [f for f in list_names(path) if not _SHARD.match(f)]
            if bad:
                foreign.append(f"{name}/{bad[0]}")
            else:
                ours.add(name)
        else:
            foreign.append(name)
    return ours, foreign


def _clear(out_dir: str, names: set[str]) -> None:
    for name in sorted(names - {MARKER}):
        remove_tree(os.path.join(out_dir, name))


def _prepare(out_dir: str, spec: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Ready out_dir for (re)harvesting; return the manifest instead if the store is already
    complete with these arguments."""
    makedirs(out_dir)
    ours, foreign = _ours(out_dir)
    if foreign:
        raise FileExistsError(f"{out_dir} holds files an activation store does not "
                              f"({foreign[:5]}); refusing to write into it: choose an empty or "
                              f"new directory")
    marker = os.path.join(out_dir, MARKER)
    if MANIFEST in ours and not overwrite:
        manifest = read_store_manifest(out_dir)
        diff = _spec_diff(_spec_of_manifest(manifest), spec)
        if diff:
            raise FileExistsError(f"{out_dir} already holds a complete activation store "
                                  f"harvested with other arguments ({diff}); pass "
                                  f"--overwrite to replace it, or choose another directory")
        _clear(out_dir, ours & {PROGRESS, MARKER + ".tmp", MANIFEST + ".tmp"})
        if MARKER in ours:
            as_path(marker).unlink()
        return manifest  # complete, same arguments: nothing to do
    if ours and MARKER not in ours and MANIFEST not in ours:
        raise FileExistsError(f"{out_dir} holds activation shards but neither {MANIFEST} nor the "
                              f"{MARKER} marker of an interrupted harvest; remove them by hand")
    if MARKER in ours and MANIFEST not in ours and not overwrite:
        old = _read_json(marker)
        diff = _spec_diff(old if isinstance(old, dict) else {}, spec)
        if diff:
            raise ValueError(f"{out_dir} holds an interrupted harvest with other arguments "
                             f"({diff}); re-run with the same arguments to resume it, or pass "
                             f"--overwrite to start over")
        return None  # resume: _resume checks the finished shards
    # fresh start: mark first, then (manifest first) remove what an earlier store left
    write_json_atomic(marker, spec)
    if MANIFEST in ours:
        as_path(os.path.join(out_dir, MANIFEST)).unlink()
    _clear(out_dir, ours - {MANIFEST})
    return None


def _resume(out_dir: str, spec: dict[str, Any], contexts) -> list[dict[str, Any]]:
    """The checked records of the shards an interrupted harvest finished; removes everything
    written after the last record (files of an unrecorded shard, tmp files, a torn line)."""
    path = os.path.join(out_dir, PROGRESS)
    records: list[dict[str, Any]] = []
    if as_path(path).exists():
        data = as_path(path).read_bytes()
        good = 0
        lines = data.split(b"\n")
        for k, line in enumerate(lines[:-1]):  # the last piece has no newline: torn or empty
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if rec is None or not _check_record(out_dir, spec, contexts, rec, len(records)):
                if k < len(lines) - 2:  # not the final line: not a torn append
                    raise ValueError(f"{path}: line {k + 1} is not a valid shard record; the "
                                     f"progress file is damaged: pass --overwrite to restart")
                break
            records.append(rec)
            good += len(line) + 1
        if good != len(data):
            _truncate(path, data[:good])
    done = {r["files"][s]["file"] for r in records for s in spec["sites"]}
    for site in spec["sites"]:
        sdir = os.path.join(out_dir, site)
        for name in list_names(sdir):
            if f"{site}/{name}" not in done:
                as_path(os.path.join(sdir, name)).unlink()
    for name in (MANIFEST + ".tmp", MARKER + ".tmp"):
        if as_path(os.path.join(out_dir, name)).exists():
            as_path(os.path.join(out_dir, name)).unlink()
    return records


def _truncate(path: str, keep: bytes) -> None:
    """Cut the file at `path` down to its first bytes `keep` (an object is rewritten whole)."""
    if is_url(path):
        as_path(path).write_bytes(keep)
        return
    with open(path, "r+b") as f:
        f.truncate(len(keep))


def _check_record(out_dir: str, spec: dict[str, Any], contexts, rec: Any, index: int) -> bool:
    """Whether a progress record describes shard `index` as this harvest would write it, with
    its files in place (size and .npy header); raises if the token contexts changed."""
    cps, n = spec["contexts_per_shard"], spec["n_contexts"]
    a, b = index * cps, min((index + 1) * cps, n)
    try:
        if rec["index"] != index or rec["contexts"] != [a, b]:
            return False
        for site in spec["sites"]:
            entry = rec["files"][site]
            path = os.path.join(out_dir, entry["file"])
            if entry["file"] != f"{site}/acts_{index:05d}.npy" or not as_path(path).is_file() \
                    or size(path) != entry["bytes"]:
                return False
            arr = _open_npy(path)
            if arr.shape != (rec["rows"], rec["d"][site]) or arr.dtype != DTYPES[spec["dtype"]]:
                return False
    except (KeyError, TypeError, ValueError, OSError):
        return False
    if _tokens_sha256(_take(contexts, np.arange(a, b), spec["ctx_len"])) != rec["tokens_sha256"]:
        raise ValueError(f"{out_dir}: the tokens of contexts {a}..{b - 1} differ from those "
                         f"shard {index} was harvested from; the token dataset changed: pass "
                         f"--overwrite to start over")
    return True


def _open_npy(path: str):
    """The .npy file at `path` without reading its rows (a memory map; for a URL, a
    `RangeNpy`): shape and dtype. Raises OSError or ValueError when it is not one."""
    if not is_url(path):
        return np.load(path, mmap_mode="r")
    arr = open_npys([path])[0]
    if isinstance(arr, Exception):
        raise arr
    return arr


def _read_json(path: str) -> Any:
    try:
        return json.loads(as_path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit=" contexts", desc="harvesting")
