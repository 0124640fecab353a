"""The plumbing both trainers share: `saejax.train.loop` (SAEs) and `saejax.train.lm` (LMs).

A run directory holds config.yaml, metrics.jsonl, checkpoints/ (and tensorboard/). Each trainer
checks a resumed run against its saved config and writes config.yaml (`prepare_run_dir`),
compiles its step ahead of time and logs the compiler's memory analysis before step 1
(`compile_step`, `start_record`), restores the newest checkpoint or starts fresh, dispatches
steps a bounded number ahead (`Runner.loop`), reads metrics back on log steps only
(`read_back`, which stops a run whose loss became NaN/Inf), refuses to checkpoint a NaN/Inf state
(`Runner.save`) and writes metrics.jsonl (`MetricsFile`). The data position is a pure function
of the step, so the checkpointed state is all a resumed run needs. A preemption notice (SIGTERM)
makes every process of the run stop at one agreed step, checkpointed (`Preemption`); the same
command resumes from it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from saejax import config as config_lib
from saejax import paths
from saejax.atomic import write_text_atomic
from saejax.checkpoint import Checkpointer, check_checkpoint_dir, storage_fault
from saejax.errors import (NonFiniteLossError, Preempted, SaejaxError, StorageError,
                           resume_hint)
from saejax.typedconfig import read_yaml
from saejax.sharding import to_host

MAX_STEPS_IN_FLIGHT = 3
"""Steps dispatched beyond the newest finished one. The loop waits for step n-3 to finish before
dispatching step n (it reads nothing back, so accelerators stay busy). Unbounded async dispatch
deadlocks the CPU backend's collectives once many multi-device steps are queued (seen with 8 fake
CPU devices: "Expected 8 threads to join the rendezvous"); the bound also caps queued batches."""


def prepare_run_dir(run_dir: paths.AnyPath, cfg: Any, resumable: set[str],
                    view: Callable[[dict], dict] | None = None) -> None:
    """Refuse run_dir if its config.yaml or any of its checkpoints (each carries its config)
    holds a run whose config differs from the config dataclass `cfg` outside the `resumable`
    fields, so a run that lost its config.yaml is never continued under other settings; then
    create run_dir and write config.yaml (process 0, atomically: the other processes of the run
    read it concurrently). Nothing is written before every check has passed.

    run_dir may be a URL (gs://, s3://; `saejax.paths.as_path`): there config.yaml is one object
    and nothing needs creating.

    view: maps a config (as a dict) to what is compared, on both sides (e.g. data paths made
    absolute and found again after the run directory moved with its data)."""
    view = view or (lambda tree: tree)
    current = view(config_lib.to_dict(cfg))

    def check(saved: dict, where: str) -> None:
        config_lib.check_same_run(view(saved), current, resumable, run_dir, where=where)

    with storage_errors(run_dir):
        if run_dir.exists() and not run_dir.is_dir():
            raise StorageError(f"run_dir {run_dir} is a file, not a directory")
        path = run_dir / "config.yaml"
        if path.exists():
            check(read_yaml(path, "the run's config"), "config.yaml")
        check_checkpoint_dir(run_dir / "checkpoints")
        metas = Checkpointer(run_dir / "checkpoints", read_only=True).saved_metas()
        for step, meta in metas.items():
            if "config" in meta:
                check(meta["config"], f"checkpoint step {step}")
        if not paths.is_url(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            config_lib.save_config(cfg, path)


@contextlib.contextmanager
def storage_errors(run_dir: paths.AnyPath):
    """An OS error (no space, read-only, a path under a file, ...) raised in the block becomes
    one StorageError line naming it and, when run_dir has a checkpoint, the last good step and
    that rerunning the same command resumes. Other errors pass unchanged."""
    try:
        yield
    except SaejaxError:
        raise
    except Exception as e:
        fault = storage_fault(e, run_dir)
        if fault is None:
            raise
        last = Checkpointer(run_dir / "checkpoints", read_only=True).latest_step()
        raise StorageError(f"run_dir {run_dir}: {fault}{resume_hint(last)}") from None


def compile_step(step_fn, *abstract_args) -> tuple[Callable, Any]:
    """`step_fn` (a jitted function) compiled ahead of time for these abstract arguments
    (ShapeDtypeStructs carrying their shardings), and its memory analysis (None where the
    backend gives none)."""
    compiled = step_fn.lower(*abstract_args).compile()
    try:
        memory = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        memory = None
    return compiled, memory


def start_record(mesh, params, tokens_per_step: int, memory) -> dict:
    """The first record of metrics.jsonl: model size, devices and the step's temporary memory.
    Written when a run starts from step 0 only, so a resumed run's metrics.jsonl is the same
    as that of a run never interrupted."""
    return {"step": 0, "event": "start",
            "n_params": n_params(params),
            "tokens_per_step": tokens_per_step, "devices": int(mesh.devices.size),
            "step_temp_bytes": getattr(memory, "temp_size_in_bytes", None)}


def n_params(params) -> int:
    """Number of parameters (array elements) in a pytree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def due(done: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, checkpoint) runs after `done` steps of a run ending at
    `last`: every `every` steps, and at the end."""
    return done % every == 0 or done == last


# ---------------------------------------------------------------- NaN/Inf


def read_back(state, *trees) -> list:
    """`trees` on the host, read in one transfer with `state.nonfinite_step`; raises
    NonFiniteLossError if a loss so far was NaN/Inf. A collective in multi-process runs."""
    *values, bad = to_host((*trees, state.nonfinite_step))
    if bad >= 0:  # the 0-based index of the bad step; metrics.jsonl counts from 1 (steps done)
        raise NonFiniteLossError(f"loss became NaN/Inf at step {int(bad) + 1}")
    return values


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def all_finite(tree) -> bool:
    """Whether every value of the pytree of arrays is finite (one scalar read back)."""
    return bool(to_host(_all_finite(tree)))


# ---------------------------------------------------------------- preemption

AGREE_EVERY = 10
"""Steps between the agreements of a multi-process run without JAX's preemption service (an
all-gather of every process's SIGTERM flag: one host sync, which drains the MAX_STEPS_IN_FLIGHT
queue once). A notice stops the run at most AGREE_EVERY + MAX_STEPS_IN_FLIGHT steps later: about
1.4 s at the 107 ms step of docs/scaling.md's 16M-feature plan, well inside a typical 30 s
notice; the rest of it is for the save."""


def _jax_preemption_sync() -> bool:
    """Whether jax.distributed started JAX's preemption sync manager (it does by default, with
    `jax_enable_preemption_service`). Its C++ SIGTERM handler records the notice, tells the
    coordination service, and every process agrees in the background on the step after the
    fastest one's (`multihost_utils.reached_preemption_sync_point`)."""
    from jax._src import distributed  # JAX has no public call for "is it running"

    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class Preemption:
    """Preemption notices (SIGTERM, what schedulers send before evicting a job, and what JAX
    listens for on TPU pods) and the step every process of the run stops at. A context manager:
    inside it, SIGTERM no longer ends the process; `agreed(n)`, called after every step by every
    process, says when to checkpoint and stop. A SIGTERM before the loop (while restoring) stops
    the run after its first step; one after its last step lets the run finish.

    - jax.distributed with its preemption service (every multi-process run, by default): JAX's
      sync point. Nothing is installed here: a Python handler would replace JAX's C++ one. A
      SIGTERM to any one process reaches all of them; JAX's listener polls for it every second.
    - One process: a Python handler sets a flag, read after each step (no host sync).
    - Several processes without the service: the flag, all-gathered every AGREE_EVERY steps.
    """

    def __init__(self):
        self.noticed = False
        self._jax = _jax_preemption_sync()
        self._processes = jax.process_count()
        self._previous = None

    def __enter__(self) -> "Preemption":
        if not self._jax and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            # None: the previous handler was not set from Python; the default is what it was.
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def _on_sigterm(self, signum, frame) -> None:
        self.noticed = True  # no I/O here: the loop acts on it after the step it is in

    def agreed(self, n: int) -> bool:
        """Whether every process stops now, after the n-th step of the loop (n = 1, 2, ...; every
        process must call it after every step). JAX counts from 0 when no call was made yet, so
        a notice that came before the loop agrees on n = 1."""
        if self._jax:
            return multihost_utils.reached_preemption_sync_point(n)
        if self._processes == 1:
            return self.noticed
        if n % AGREE_EVERY:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.noticed))))


# ---------------------------------------------------------------- checkpoints and the loop


class Runner:
    """A run's checkpoints (`Checkpointer` under run_dir/checkpoints) and its step loop. A context
    manager: leaving it waits for pending saves and closes the checkpointer.

    meta: what the trainer's checkpoints carry (`save`'s meta). Given it, the runner handles
    preemption while it is entered: on an agreed notice (`Preemption`) the loop checkpoints the
    step every process has reached, with this meta, and raises Preempted."""

    def __init__(self, run_dir: paths.AnyPath, *, keep: int, async_save: bool,
                 meta: dict | None = None):
        self.ckpt_dir = run_dir / "checkpoints"
        with storage_errors(run_dir):
            self.ckpt = Checkpointer(self.ckpt_dir, keep=keep, async_save=async_save)
        self.meta = meta
        self.preemption = Preemption() if meta is not None else None
        self._saved_step: int | None = None
        self.before_save: list[Callable[[], None]] = []
        """Called before each checkpoint starts (`MetricsFile.flush`): what a committed
        checkpoint's step has written is then stored, whatever stops the run later."""

    def restore(self, abstract_state) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest good checkpoint, laid out as `abstract_state`."""
        return self.ckpt.restore_latest(abstract_state)

    def save(self, step: int, state, meta: dict) -> None:
        """Checkpoint `state` (with `step` as its data position), unless a loss so far was NaN/Inf
        or the parameters or optimizer state hold one: then NonFiniteLossError, nothing saved.
        A sweep's state (a dict of group states) keeps members whose loss went NaN/Inf frozen
        at their last good values, so only the values are checked."""
        if isinstance(state, dict):
            finite = to_host(_all_finite([(s.params, s.opt_state) for s in state.values()]))
        else:
            (finite,) = read_back(state, _all_finite((state.params, state.opt_state)))
        if not finite:  # a finite loss whose update overflowed: the next loss is NaN
            raise NonFiniteLossError(f"parameters became NaN/Inf at step {step}")
        for hook in self.before_save:
            hook()
        self.ckpt.save(step, state, {**meta, "step": step, "data_position": step})
        self._saved_step = step

    def loop(self, state, step_fn, batches, start: int, stop: int,
             on_step: Callable[[int, Any, dict], Any]):
        """Run steps start..stop-1 on `batches` (next/close); after each, `on_step(done, state,
        metrics) -> state` does the trainer's host work (log, resample, evaluate, `save`).
        Returns the final state once every save is committed. A NaN/Inf stops the run naming
        the last good checkpoint; an agreed preemption notice saves the step reached (unless
        on_step just did) and raises Preempted once that save is committed."""
        in_flight: collections.deque = collections.deque()
        try:
            for step in range(start, stop):
                state, metrics = step_fn(state, batches.next())
                in_flight.append(jax.tree.leaves(metrics)[0])  # metrics are not donated, state is
                if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                    in_flight.popleft().block_until_ready()
                state = on_step(step + 1, state, metrics)
                if self.preemption is not None and self.preemption.agreed(step + 1 - start):
                    self._stop_preempted(step + 1, state)
            self.ckpt.wait()
        except NonFiniteLossError as e:
            self.ckpt.wait()
            # No "rerun to resume" here: the same command would reach the same NaN.
            raise NonFiniteLossError(
                f"{e}; stopped without saving. Last good checkpoint: "
                f"{self.ckpt.latest_step()} in {self.ckpt_dir}") from None
        finally:
            batches.close()
        return state

    def _stop_preempted(self, step: int, state) -> None:
        """Checkpoint `step` (the post-on_step state, as a periodic save there would hold), wait
        for it to be committed, raise Preempted."""
        if self._saved_step != step:
            self.save(step, state, self.meta)
        self.ckpt.wait()
        if jax.process_count() > 1:
            # Nobody exits before every process (process 0 commits) is done: a launcher that
            # stops the rest at the first exit (srun --kill-on-bad-exit) cannot cut the save.
            multihost_utils.sync_global_devices(f"saejax preempted at step {step}")
        raise Preempted(f"saved step {step} in {self.ckpt_dir}; rerun the same command to resume")

    def __enter__(self) -> "Runner":
        if self.preemption is not None:
            self.preemption.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.preemption is not None:
            self.preemption.__exit__()
        try:
            self.ckpt.wait()
            self.ckpt.close()
        except Exception:
            if exc is None:
                raise
            # Already failing: the first error is the one to report (a failed async save
            # re-raises on every later wait).


# ---------------------------------------------------------------- metrics.jsonl


class MetricsFile:
    """run_dir/metrics.jsonl (written by process 0), optional TensorBoard scalars, a progress bar.

    A resumed run first drops what it will write again (`start_step`). A context manager that
    closes the bar and TensorBoard writer.

    In an object store (run_dir a URL), which cannot append, the records are kept in memory and
    the object rewritten whole by `flush`: before each checkpoint of `runner` (so the records
    up to a committed checkpoint, all a resumed run keeps, are stored) and on leaving."""

    def __init__(self, run_dir: paths.AnyPath, *, start_step: int, total_steps: int,
                 tensorboard: bool = False, progress: bool = False,
                 runner: Runner | None = None):
        self.run_dir, self.path = run_dir, run_dir / "metrics.jsonl"
        self.is_main = jax.process_index() == 0
        self._buffered: list[str] | None = [] if paths.is_url(run_dir) else None
        self._unflushed = False
        if self.is_main:
            with storage_errors(run_dir):
                self._truncate_after(start_step)
        if runner is not None:
            runner.before_save.append(self.flush)
        self.bar = None
        self.tb: dict[str, Any] | None = {} if tensorboard and self.is_main else None
        if progress and self.is_main:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to `step` but the final summary (re-written at the end), and drop
        a last line cut short by a killed process."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial line: the process died while appending it
            if record["step"] <= step and record.get("event") != "summary":
                keep.append(line)
        if self._buffered is not None:
            self._buffered = [line + "\n" for line in keep]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        if self._buffered is not None:
            self._buffered.append(json.dumps(record) + "\n")
            self._unflushed = True
        else:
            with storage_errors(self.run_dir), self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            writer = self._writer(record.get("member", ""))
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v) and k != "step":
                    writer.add_scalar(k, v, record["step"])

    def _writer(self, member: str):
        """The TensorBoard writer of a sweep member (a run of its own, tensorboard/<member>), or
        of the run."""
        if member not in self.tb:
            from tensorboardX import SummaryWriter
            self.tb[member] = SummaryWriter(str(self.run_dir / "tensorboard" / member))
        return self.tb[member]

    def flush(self) -> None:
        """Store the records written so far (an object store's: rewrite the object)."""
        if self._unflushed:
            with storage_errors(self.run_dir):
                write_text_atomic(self.path, "".join(self._buffered))
            self._unflushed = False

    def show(self, step: int, **postfix: str) -> None:
        """Move the progress bar to `step`, with these values beside it."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(**postfix)

    def __enter__(self) -> "MetricsFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.bar is not None:
            self.bar.close()
        for writer in (self.tb or {}).values():
            writer.close()
        try:
            self.flush()
        except Exception:
            if exc is None:
                raise  # else the error that ends the run is the one to report


class Throughput:
    """Tokens per second over windows of steps, and their mean over the whole run."""

    def __init__(self, step: int, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.steps, self.seconds = 0, 0.0
        self.restart(step)

    def restart(self, step: int) -> None:
        """Start a window at `step` now (the time since the last one is not counted)."""
        self._step, self._t0 = step, time.perf_counter()

    def rate(self, step: int) -> float:
        """Tokens per second of the window ending at `step`, which starts the next window."""
        n, dt = step - self._step, time.perf_counter() - self._t0
        self.steps, self.seconds = self.steps + n, self.seconds + dt
        self.restart(step)
        return n * self.tokens_per_step / max(dt, 1e-9)

    def mean(self) -> float | None:
        return self.steps * self.tokens_per_step / self.seconds if self.seconds else None
