"""Checkpoints of a training run: async, atomic, keep-last-N, restorable onto any mesh, verified.

A thin wrapper over Orbax's `CheckpointManager`. Orbax already gives us atomicity (each step is
written to `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once complete, and only
renamed step directories are listed), async writes and resharding on restore. What it does not
give is a check that the bytes read back are the bytes written, so every save also stores a
content fingerprint of the state in its metadata, and `restore_latest` recomputes it on the
restored arrays and falls back to an older checkpoint when anything does not match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from saejax.errors import CheckpointError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

PyTree = Any
_FP_KEY = "_saejax_fingerprint"
"""Reserved meta key holding the fingerprint; stripped from the meta handed back by restore."""


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
    if meta is not None:  # hash what a JSON round trip gives back (tuples become lists, etc.)
        canon = json.dumps(json.loads(json.dumps(meta)), sort_keys=True)
        fp["<meta sha256>"] = hashlib.sha256(canon.encode()).hexdigest()
    return fp


def _reason(e: BaseException) -> str:
    """One line for a failed restore: the innermost cause (Orbax wraps TensorStore's errors)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


class Checkpointer:
    """Saves and restores (step, state, meta) under `directory`, one Orbax step directory each.

    `state` is a pytree of jax.Arrays (sharded however), `meta` a JSON-able dict.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._damaged: list[int] = []  # found by restore_latest; moved aside before the next save
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save,
                # Left-over `<step>.orbax-checkpoint-tmp` dirs of a killed save are never listed as
                # steps anyway; this just deletes them when the run restarts.
                cleanup_tmp_directories=True),
        )

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Start saving; returns once the arrays are copied off the device (so they may be donated).

        The first save after `restore_latest` skipped damaged checkpoints moves them aside to
        `<step>.damaged` (kept for inspection): a resumed run re-reaching such a step would
        otherwise fail as a duplicate, and keep-last-N would count them and prune good ones.
        Restoring alone (e.g. for export) never changes the directory.
        """
        self._quarantine_damaged()
        meta = {**meta, _FP_KEY: fingerprint(state, meta)}
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

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
                return (step, *self._restore_verified(step, abstract_state, partial))
            except Exception as e:  # damage surfaces as many exception types; all mean "skip it"
                reasons[step] = _reason(e)
                msg = f"checkpoint step {step} in {self.directory} is damaged ({reasons[step]})"
                log.warning(msg)
                warnings.warn(msg, stacklevel=2)
                self._damaged.append(step)
        if steps:
            raise CheckpointError(f"no checkpoint in {self.directory} restores: " + "; ".join(
                f"step {s}: {r}" for s, r in reasons.items()))
        return None

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
        """Newest committed step on disk (not verified), or None."""
        return self._mngr.latest_step()

    def wait(self) -> None:
        """Block until every started save is committed (renamed into place)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()
