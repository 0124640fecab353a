"""Checkpoints of a training run: async, atomic, keep-last-N, restorable onto any mesh, verified.

A thin wrapper over Orbax's `CheckpointManager`. Orbax already gives us atomicity (each step is
written to `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once complete, and only
renamed step directories are listed), async writes and resharding on restore. What it does not
give is a check that the bytes read back are the bytes written, so every save also stores a
content fingerprint of the state in its metadata, and `restore_latest` recomputes it on the
restored arrays and falls back to an older checkpoint when anything does not match.

The meta also carries the run's config, which `saved_metas` reads (verified, without the arrays)
so a trainer can refuse to continue checkpoints under other settings. A save the file system
cannot take (no room, read-only, a failing write in Orbax's threads) is one StorageError naming
the OS error and the last committed step, which is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from saejax.errors import CheckpointError, StorageError, os_fault, resume_hint

PyTree = Any
_FP_KEY = "_saejax_fingerprint"
"""Reserved meta key holding the fingerprint; stripped from the meta handed back by restore."""
_META_KEY = "<meta sha256>"
"""The fingerprint's entry for the meta itself (the rest are the state's leaves)."""


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The leaf's raw bits as uint32 (narrower types zero-extended, 64-bit ones split in two)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize
    if width >= 4:  # bitcast to uint32; an 8-byte type gains a trailing axis of 2
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[width]).astype(jnp.uint32)


@jax.jit
def _fingerprint_sums(leaves: list[jax.Array]) -> jax.Array:
    """uint32 [n_leaves, 2]: per leaf, sum(bits) and sum(bits * (2i+1)) over flat index i.

    Wrapping integer sums are associative and commutative, so the result is exact whatever the
    sharding or device count: a checkpoint restored onto another mesh has the same fingerprint.
    The position weight makes it sensitive to swapped elements, not just changed ones.
    """
    rows = []
    for x in leaves:
        bits = _leaf_bits(x)
        odd = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape) * 2 + 1
        rows.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                               jnp.sum(bits * odd, dtype=jnp.uint32)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def _path_name(path) -> str:
    """"params/W_dec" for a leaf path, whether the tree is a struct dataclass or a dict, so a
    partial restore into plain dicts names its leaves as the saved state did."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                    for k in path)


def fingerprint(state: PyTree, meta: dict | None = None) -> dict:
    """{leaf path: [s1, s2]} of the state (computed on device; 2 uint32 per leaf reach the host),
    plus a sha256 of the JSON meta so edits to the meta file are caught too."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    sums = jax.device_get(_fingerprint_sums([x for _, x in flat])).tolist()
    fp = {_path_name(p): s for (p, _), s in zip(flat, sums)}
    if meta is not None:
        fp[_META_KEY] = _meta_sha256(meta)
    return fp


def _meta_sha256(meta: dict) -> str:
    """sha256 of what a JSON round trip of `meta` gives back (tuples become lists, etc.)."""
    canon = json.dumps(json.loads(json.dumps(meta)), sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def _reason(e: BaseException) -> str:
    """One line for a failed restore: the innermost cause (Orbax wraps TensorStore's errors)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def free_space(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system of `path` (None: unknown)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # AttributeError: no statvfs on this platform
        return None
    return st.f_bavail * st.f_frsize


def _none_restores(directory: Path, reasons: dict[int, str]) -> CheckpointError:
    return CheckpointError(f"no checkpoint in {directory} restores: " + "; ".join(
        f"step {s}: {r}" for s, r in reasons.items()))


class Checkpointer:
    """Saves and restores (step, state, meta) under `directory`, one Orbax step directory each.

    `state` is a pytree of jax.Arrays (sharded however), `meta` a JSON-able dict. A
    `read_only` one (for inspection, export, evaluation) never creates, cleans or saves anything,
    so it may look at the run directory of a training still writing there.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self._damaged: list[int] = []  # found by restore_latest; moved aside before the next save
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save and not read_only,
                create=not read_only,
                # Left-over `<step>.orbax-checkpoint-tmp` dirs of a killed save are never listed as
                # steps anyway; this just deletes them when the run restarts.
                cleanup_tmp_directories=not read_only),
        )

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Start saving; returns once the arrays are copied off the device (so they may be donated).

        The first save after `restore_latest` skipped damaged checkpoints moves them aside to
        `<step>.damaged` (kept for inspection): a resumed run re-reaching such a step would
        otherwise fail as a duplicate, and keep-last-N would count them and prune good ones.
        Restoring alone (e.g. for export) never changes the directory.

        A failing file system (here, or in an earlier save still being written) raises
        StorageError naming the OS error and the last committed step.
        """
        if self.read_only:
            raise RuntimeError(f"Checkpointer({self.directory}) is read-only")
        meta = {**meta, _FP_KEY: fingerprint(state, meta)}
        with self._storage_errors():
            self._check_writable(state)
            self._quarantine_damaged()
            self._mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def _check_writable(self, state: PyTree) -> None:
        """Refuse a save into a read-only directory or one without room for this process's share
        of the state, before Orbax starts it: a write failing in Orbax's background threads is
        also reported, but they log pages of tracebacks first."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK):
            raise OSError(errno.EROFS, "not writable (read-only file system or permissions)")
        need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
                   if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)) // jax.process_count()
        free = free_space(self.directory)
        if free is not None and free < need:
            raise OSError(errno.ENOSPC, f"No space left on device (a checkpoint needs about "
                          f"{need / 2**20:.3g} MiB, {free / 2**20:.3g} MiB are free)")

    @contextlib.contextmanager
    def _storage_errors(self):
        """OS errors of writes (Orbax reports them as ValueErrors of TensorStore's, often from a
        background thread) as one StorageError line."""
        try:
            yield
        except Exception as e:
            fault = os_fault(e)
            if fault is None:
                raise
            raise StorageError(f"cannot write a checkpoint in {self.directory}: {fault}"
                               f"{resume_hint(self.latest_step())}") from None

    def restore_latest(self, abstract_state: PyTree,
                       partial: bool = False) -> tuple[int, PyTree, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores and verifies, else None if
        there is none; raises CheckpointError if there are some but all are damaged.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set: the arrays are
        laid out that way, whatever mesh they were saved from. With `partial`, it is a nested
        dict naming a subset of the saved state (e.g. {"params": ..., "input_scale": ...}): only
        those arrays are read, and only their fingerprints are checked.
        """
        self.wait()
        self._mngr.reload()
        steps = sorted(self._mngr.all_steps(), reverse=True)
        reasons = {}
        for step in steps:
            try:
                restored = self._restore_verified(step, abstract_state, partial)
            except Exception as e:  # damage surfaces as many exception types; all mean "skip it"
                reasons[step] = _reason(e)
                self._damaged.append(step)
                continue
            for bad, reason in reasons.items():  # said only when an older one is used instead
                warnings.warn(f"checkpoint step {bad} in {self.directory} is damaged ({reason})",
                              stacklevel=2)
            return (step, *restored)
        if steps:
            raise _none_restores(self.directory, reasons)
        return None

    def saved_metas(self) -> dict[int, dict]:
        """{step: meta} of every committed checkpoint whose meta reads back and matches its
        fingerprint (the arrays are not read: cheap). Raises CheckpointError when there are
        checkpoints but no meta is intact, as restoring would."""
        self._mngr.reload()
        metas, reasons = {}, {}
        for step in sorted(self._mngr.all_steps(), reverse=True):
            try:
                out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                meta = dict(out["meta"])
                saved = meta.pop(_FP_KEY)
                if saved[_META_KEY] != _meta_sha256(meta):
                    raise CheckpointError("content fingerprint mismatch in <meta sha256>")
                metas[step] = meta
            except Exception as e:  # a damaged meta is skipped here as it is by restore_latest
                reasons[step] = _reason(e)
        if reasons and not metas:
            raise _none_restores(self.directory, reasons)
        return metas

    def _restore_verified(self, step: int, abstract_state: PyTree,
                          partial: bool) -> tuple[PyTree, dict]:
        if partial:
            restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                                        abstract_state)
            state_args = ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args,
                                                partial_restore=True)
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=state_args, meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        saved = meta.pop(_FP_KEY, None)
        if saved is None:
            raise CheckpointError("meta holds no fingerprint")
        got = fingerprint(out["state"], meta)
        if partial:
            saved = {k: v for k, v in saved.items() if k in got}
        if got != saved:
            bad = sorted(k for k in saved.keys() | got.keys() if saved.get(k) != got.get(k))
            raise CheckpointError(f"content fingerprint mismatch in {', '.join(bad)}")
        return out["state"], meta

    def _quarantine_damaged(self) -> None:
        if not self._damaged:
            return
        if jax.process_index() == 0:
            for step in self._damaged:
                src, dst = self.directory / str(step), self.directory / f"{step}.damaged"
                if src.exists():
                    shutil.rmtree(dst, ignore_errors=True)
                    src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("saejax_checkpoint_quarantine")
        self._damaged = []
        self._mngr.reload()

    def latest_step(self) -> int | None:
        """Newest committed step on disk as listed now (not verified), or None; None too when the
        directory cannot be listed."""
        try:
            self._mngr.reload()
            return self._mngr.latest_step()
        except Exception:  # asked while reporting another failure: never mask it
            return None

    def wait(self) -> None:
        """Block until every started save is committed (renamed into place); StorageError when
        one failed on the file system."""
        with self._storage_errors():
            self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()
