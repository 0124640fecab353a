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

Object stores. A gs:// directory is Orbax's own (TensorStore writes it natively; there is no GCS
emulator here, so that path is untested). Orbax cannot write arrays to s3:// (0.12.8: its
TensorStore spec turns "s3://b/x" into the relative "s3:/b/x"), so an s3:// directory is an
`_S3Mirror`: Orbax writes each checkpoint into a local staging directory, and the finished step
is uploaded with a commit object written last (see there).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from saejax import objstore, paths
from saejax.errors import CheckpointError, ConfigError, StorageError, os_fault, resume_hint

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


def storage_fault(e: BaseException, where: str | os.PathLike) -> str | None:
    """`os_fault`; for a URL `where`, also the message of an object-store client's OSError
    (s3fs raises them without an errno: FileNotFoundError("The specified bucket does not
    exist"))."""
    fault = os_fault(e)
    if fault is None and paths.is_url(where) and isinstance(e, OSError) and str(e):
        fault = str(e).splitlines()[0]
    return fault


# ---------------------------------------------------------------- s3:// through local staging

STAGING_ENV = "SAEJAX_STAGING_DIR"
"""Where s3:// checkpoints are staged (default: saejax-staging in the system temp directory),
under the URL's own path (<dir>/s3/<bucket>/<key>); it holds up to keep-last-N checkpoints, as
the bucket does. A multi-process run must name one that every process shares (Orbax's primary
process merges the others' files there)."""
COMMIT_SUFFIX = ".saejax-commit"
"""`<step>.saejax-commit`, beside the step's objects: written last, it commits the step."""
DAMAGED_SUFFIX = ".saejax-damaged"
"""What a damaged step's commit object becomes (`Checkpointer.save` sets damaged steps aside)."""
_META_FILE = "meta/metadata"
"""The file Orbax's JsonCheckpointHandler writes the meta item to, inside a step directory."""


def needs_staging(directory: str | os.PathLike) -> bool:
    """Whether checkpoints in `directory` go through a local staging directory (s3://)."""
    return os.fspath(directory).startswith("s3://")


def staging_dir(url: str) -> Path:
    """The local staging directory of the s3:// checkpoint directory `url`."""
    root = os.environ.get(STAGING_ENV) or os.path.join(tempfile.gettempdir(), "saejax-staging")
    scheme, rest = url.split("://", 1)
    return Path(root).absolute() / scheme / rest.strip("/")


def check_checkpoint_dir(directory: str | os.PathLike) -> None:
    """Refuse, before anything is written, a checkpoint directory this run cannot use: s3:// in a
    multi-process run without a staging directory its processes share."""
    if needs_staging(directory) and jax.process_count() > 1 and not os.environ.get(STAGING_ENV):
        raise ConfigError(f"{os.fspath(directory)}: a multi-process run checkpointing to s3:// "
                          f"needs a staging directory all its processes share: set {STAGING_ENV} "
                          "to one (e.g. on NFS)")


def _remove_tree(url: str) -> None:
    """Delete every object under the prefix `url` (nothing when there is none)."""
    try:
        objstore.remove_tree(url)
    except FileNotFoundError:
        pass


class _S3Mirror:
    """The bucket side of an s3:// checkpoint directory, whose steps Orbax writes locally (in
    `staging`). A finished step `<step>/` is uploaded (each file one object), then its commit
    object `<step>.saejax-commit` (the step's files and sizes) is written last: a step without
    one (a killed upload) is incomplete, never listed, and deleted when training restarts. A
    step is restored from its local copy when that holds exactly the committed files, else
    downloaded first. A damaged step is set aside by renaming its commit object to
    `<step>.saejax-damaged` (its objects stay until the step is saved again). `Checkpointer`
    calls it on process 0 only."""

    def __init__(self, url: str, staging: Path):
        self.url, self.staging = url.rstrip("/"), staging

    def _commit(self, step: int, suffix: str = COMMIT_SUFFIX):
        return paths.as_path(f"{self.url}/{step}{suffix}")

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(int(n[:-len(COMMIT_SUFFIX)]) for n in objstore.list_names(self.url)
                      if n.endswith(COMMIT_SUFFIX) and n[:-len(COMMIT_SUFFIX)].isdigit())

    def files(self, step: int) -> dict[str, int]:
        """{relative path: size} of a committed step, as its commit object lists them."""
        return json.loads(self._commit(step).read_text())["files"]

    def meta(self, step: int) -> dict:
        """The JSON meta item of a committed step, read from the bucket (arrays not read)."""
        return json.loads(paths.as_path(f"{self.url}/{step}/{_META_FILE}").read_text())

    def publish(self, step: int, keep: int | None) -> None:
        """Upload the finished local step, commit it, then delete the steps beyond the newest
        `keep` (commit object first, so a half-deleted step is never listed)."""
        files = objstore.files_under(self.staging / str(step))
        if self._commit(step, DAMAGED_SUFFIX).exists():
            self._commit(step, DAMAGED_SUFFIX).unlink()  # first: then its objects are garbage
        _remove_tree(f"{self.url}/{step}")  # a killed upload's, or a damaged step's
        objstore.upload_files(self.staging / str(step), f"{self.url}/{step}", list(files))
        self._commit(step).write_text(json.dumps({"step": step, "files": files}))
        for old in (self.steps()[:-keep] if keep else []):
            self._commit(old).unlink()
            _remove_tree(f"{self.url}/{old}")

    def set_aside(self, step: int) -> None:
        """Uncommit a damaged step, keeping its objects for inspection."""
        commit = self._commit(step)
        if commit.exists():
            self._commit(step, DAMAGED_SUFFIX).write_text(commit.read_text())
            commit.unlink()

    def clean(self) -> None:
        """Before training writes here: delete the bucket's uncommitted steps (killed uploads),
        and the local steps that are not committed (saved, never uploaded) or half downloaded."""
        committed = {str(s) for s in self.steps()}
        names = objstore.list_names(self.url)
        kept = committed | {n[:-len(DAMAGED_SUFFIX)] for n in names if n.endswith(DAMAGED_SUFFIX)}
        for name in names:
            if name.isdigit() and name not in kept:
                _remove_tree(f"{self.url}/{name}")
        if self.staging.is_dir():
            for d in self.staging.iterdir():
                if (d.name.isdigit() and d.name not in committed) or d.name.endswith(".download"):
                    shutil.rmtree(d)

    def fetch(self, step: int, fresh: bool) -> None:
        """Make the local copy of a committed step hold exactly its committed files: kept when it
        does (unless `fresh`), else downloaded beside it and renamed into place."""
        files, local = self.files(step), self.staging / str(step)
        if not fresh and local.is_dir() and objstore.files_under(local) == files:
            return
        tmp = self.staging / f"{step}.download"
        shutil.rmtree(tmp, ignore_errors=True)
        objstore.download_files(f"{self.url}/{step}", tmp, list(files))
        if objstore.files_under(tmp) != files:
            raise CheckpointError(f"step {step} downloaded from {self.url} differs from its "
                                  "commit object")
        shutil.rmtree(local, ignore_errors=True)
        tmp.rename(local)


def _on_process_0(fn, what: str) -> None:
    """`fn()` on process 0 only, every process waiting until it is done; when it fails, process
    0 raises its error and the others a StorageError saying so."""
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:  # raised after the agreement below, so no peer waits for us
            error = e
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and np.any(failed):
            raise StorageError(f"{what} failed on process 0")
    if error is not None:
        raise error


class Checkpointer:
    """Saves and restores (step, state, meta) under `directory`, one Orbax step directory each.

    `state` is a pytree of jax.Arrays (sharded however), `meta` a JSON-able dict. A
    `read_only` one (for inspection, export, evaluation) never creates, cleans or saves anything,
    so it may look at the run directory of a training still writing there.

    `directory` may be a gs:// URL (Orbax writes it itself) or an s3:// one (`_S3Mirror`:
    staged in `staging_dir(url)`; a read-only one downloads into a private temporary directory,
    so it never touches the staging of a training that may be running).
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        url = paths.is_url(directory)
        self.directory = paths.as_path(directory) if url else Path(directory).absolute()
        self.read_only = read_only
        self._damaged: list[int] = []  # found by restore_latest; moved aside before the next save
        self._keep, self._async = keep, async_save and not read_only
        self._mirror: _S3Mirror | None = None
        self._orbax_dir = self.directory  # where Orbax writes: here, or the s3:// staging
        self._manager: ocp.CheckpointManager | None = None
        self._upload: threading.Thread | None = None  # process 0 publishing an s3:// step
        self._upload_error: BaseException | None = None
        if needs_staging(directory):
            self._open_mirror(os.fspath(directory))
        else:
            self._manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self._orbax_dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self._keep, enable_async_checkpointing=self._async,
                create=not self.read_only,
                # Left-over `<step>.orbax-checkpoint-tmp` dirs of a killed save are never listed as
                # steps anyway; this just deletes them when the run restarts.
                cleanup_tmp_directories=not self.read_only),
        )

    def _open_mirror(self, url: str) -> None:
        """Stage an s3:// directory: a training's staging is cleaned against the bucket first
        (`_S3Mirror.clean`); a read-only one opens Orbax only when it restores (`_mngr`)."""
        if self.read_only:
            staging = Path(tempfile.mkdtemp(prefix="saejax-restore-"))
            weakref.finalize(self, shutil.rmtree, staging, True)
        else:
            check_checkpoint_dir(url)
            staging = staging_dir(url)
        self._mirror = _S3Mirror(url, staging)
        self._orbax_dir = staging
        if not self.read_only:
            with self._storage_errors():
                _on_process_0(self._mirror.clean, f"cleaning the checkpoints of {url}")
            self._manager = self._new_manager()

    @property
    def _mngr(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = self._new_manager()
        return self._manager

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Start saving; returns once the arrays are copied off the device (so they may be donated).

        The first save after `restore_latest` skipped damaged checkpoints moves them aside to
        `<step>.damaged` (kept for inspection): a resumed run re-reaching such a step would
        otherwise fail as a duplicate, and keep-last-N would count them and prune good ones.
        (On s3://, the staged copy is moved aside and the bucket's uncommitted, `_S3Mirror`.)
        Restoring alone (e.g. for export) never changes the directory.

        On s3://, the step is published (uploaded, then committed) by process 0 once Orbax has
        finished it: in the background for an async save, before this returns otherwise.

        A failing file system (here, or in an earlier save still being written) raises
        StorageError naming the OS error and the last committed step.
        """
        if self.read_only:
            raise RuntimeError(f"Checkpointer({self.directory}) is read-only")
        meta = {**meta, _FP_KEY: fingerprint(state, meta)}
        with self._storage_errors():
            self._join_upload()
            self._check_writable(state)
            self._quarantine_damaged()
            self._mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
            self._start_upload(step)

    def _start_upload(self, step: int) -> None:
        """Publish `step` to the bucket (s3:// only, process 0), after Orbax has finished it."""
        if self._mirror is None or jax.process_index() != 0:
            return
        if not self._async:
            self._publish(step)
            return

        def run() -> None:
            try:
                self._publish(step)
            except BaseException as e:  # handed to the next save or wait (`_join_upload`)
                self._upload_error = e

        self._upload = threading.Thread(target=run, name=f"saejax-upload-{step}", daemon=True)
        self._upload.start()

    def _publish(self, step: int) -> None:
        self._mngr.wait_until_finished()
        self._mirror.publish(step, self._keep)

    def _join_upload(self) -> None:
        """Wait for the step being published; raise what it failed with."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        error, self._upload_error = self._upload_error, None
        if error is not None:
            raise error

    def _check_writable(self, state: PyTree) -> None:
        """Refuse a save into a read-only directory or one without room for this process's share
        of the state, before Orbax starts it: a write failing in Orbax's background threads is
        also reported, but they log pages of tracebacks first. (gs://: not checked.)"""
        if paths.is_url(self._orbax_dir):
            return
        self._orbax_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self._orbax_dir, os.W_OK):
            raise OSError(errno.EROFS, "not writable (read-only file system or permissions)")
        need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
                   if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)) // jax.process_count()
        free = free_space(self._orbax_dir)
        if free is not None and free < need:
            raise OSError(errno.ENOSPC, f"No space left on device (a checkpoint needs about "
                          f"{need / 2**20:.3g} MiB, {free / 2**20:.3g} MiB are free)")

    @contextlib.contextmanager
    def _storage_errors(self):
        """OS errors of writes (Orbax reports them as ValueErrors of TensorStore's, often from a
        background thread; object-store clients as OSErrors without an errno) as one
        StorageError line."""
        try:
            yield
        except Exception as e:
            fault = storage_fault(e, self.directory)
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
        those arrays are read, and only their fingerprints are checked (s3://: the whole step is
        downloaded all the same).
        """
        self.wait()
        steps = sorted(self._steps(), reverse=True)
        reasons = {}
        for step in steps:
            try:
                restored = self._restore_step(step, abstract_state, partial)
            except StorageError:
                raise  # the bucket could not be read: not damage, and no reason to fall back
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

    def _steps(self) -> list[int]:
        """Committed steps as listed now (s3://: those with a commit object)."""
        if self._mirror is not None:
            return self._mirror.steps()
        self._mngr.reload()
        return list(self._mngr.all_steps())

    def _restore_step(self, step: int, abstract_state: PyTree,
                      partial: bool) -> tuple[PyTree, dict]:
        """`_restore_verified`; on s3://, of the step fetched into staging, fetched afresh and
        tried again when its staged copy does not verify (that copy may be what is damaged)."""
        if self._mirror is None:
            return self._restore_verified(step, abstract_state, partial)
        try:
            self._fetch(step, fresh=False)
            return self._restore_verified(step, abstract_state, partial)
        except StorageError:
            raise
        except Exception:
            self._fetch(step, fresh=True)
            return self._restore_verified(step, abstract_state, partial)

    def _fetch(self, step: int, fresh: bool) -> None:
        """Bring a committed s3:// step into staging (process 0 downloads it, read-only
        checkpointers each into their own), and let Orbax see it."""
        fetch = lambda: self._mirror.fetch(step, fresh)  # noqa: E731
        try:
            if self.read_only:
                fetch()
            else:
                _on_process_0(fetch, f"downloading checkpoint step {step}")
        except CheckpointError:
            raise
        except Exception as e:
            fault = storage_fault(e, self.directory)
            if fault is None:
                raise
            raise StorageError(f"cannot read checkpoint step {step} in {self.directory}: "
                               f"{fault}") from None
        self._mngr.reload()

    def saved_metas(self) -> dict[int, dict]:
        """{step: meta} of every committed checkpoint whose meta reads back and matches its
        fingerprint (the arrays are not read: cheap). Raises CheckpointError when there are
        checkpoints but no meta is intact, as restoring would."""
        metas, reasons = {}, {}
        for step in sorted(self._steps(), reverse=True):
            try:
                if self._mirror is not None:
                    meta = self._mirror.meta(step)
                else:
                    out = self._mngr.restore(step, args=ocp.args.Composite(
                        meta=ocp.args.JsonRestore()))
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
                src, dst = self._orbax_dir / str(step), self._orbax_dir / f"{step}.damaged"
                if src.exists():
                    shutil.rmtree(dst, ignore_errors=True)
                    src.rename(dst)
                if self._mirror is not None:
                    self._mirror.set_aside(step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("saejax_checkpoint_quarantine")
        self._damaged = []
        self._mngr.reload()

    def latest_step(self) -> int | None:
        """Newest committed step as listed now (not verified), or None; None too when the
        directory cannot be listed."""
        try:
            if self._mirror is not None:
                return max(self._mirror.steps(), default=None)
            self._mngr.reload()
            return self._mngr.latest_step()
        except Exception:  # asked while reporting another failure: never mask it
            return None

    def wait(self) -> None:
        """Block until every started save is committed (renamed into place; on s3://, uploaded
        and its commit object written); StorageError when one failed on the file system."""
        with self._storage_errors():
            self._mngr.wait_until_finished()
            self._join_upload()

    def close(self) -> None:
        try:
            self._join_upload()
        finally:
            if self._manager is not None:
                self._manager.close()
