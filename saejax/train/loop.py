"""The training loop: restore or init, step, resample, log, checkpoint, summarise.

Data position is a pure function of the step, and everything else lives in the checkpointed
`TrainState`, so a run restarted from its run directory continues bit for bit.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from saejax import config as config_lib
from saejax.checkpoint import Checkpointer
from saejax.config import Config
from saejax.data import make_source
from saejax.data.onthefly import OnTheFlyFeed, make_feed
from saejax.data.prefetch import Prefetcher
from saejax.sharding import host_batch_to_global, make_mesh, process_rows
from saejax.train.metrics import MetricsLogger, NonFiniteLossError, nonfinite_message, to_host
from saejax.train.step import StepContract

# Config fields that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = {"train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.async_checkpointing", "train.tensorboard",
                     "train.progress", "train.run_dir", "train.dead_window_tokens",
                     "mesh.data", "mesh.model"}
INIT_SAMPLE = 16_384  # rows for the geometric median / input scale
EVAL_ROWS = 32_768
MAX_STEPS_IN_FLIGHT = 3
"""Steps dispatched beyond the newest finished one. The loop waits for step n-3 to finish before
dispatching step n (it reads nothing back, so accelerators stay busy). Unbounded async dispatch
deadlocks the CPU backend's collectives once many multi-device steps are queued (seen with 8 fake
CPU devices: "Expected 8 threads to join the rendezvous"); the bound also caps queued batches."""


def resumable_changes(cfg: Config) -> set[str]:
    """RESUMABLE_CHANGES, plus train.steps when the run length shapes nothing (a constant LR and
    resampling at fixed steps): a decaying LR or resampling at fractions of the run would
    silently differ from the run that was started."""
    fixed_length = cfg.optim.decay == "constant" and not cfg.resample.at_fractions
    return RESUMABLE_CHANGES | ({"train.steps"} if fixed_length else set())


def check_resumable(saved: dict, cfg: Config) -> None:
    config_lib.check_same_run(saved, cfg, resumable_changes(cfg), cfg.train.run_dir)


def global_rows(rows: np.ndarray, mesh) -> jax.Array:
    return host_batch_to_global(rows, mesh)


def host_sample(source, n: int, seed: int, mesh) -> np.ndarray:
    """This process's share of a deterministic sample of about n rows (n rounded down so the
    `data` axis divides it)."""
    n -= n % mesh.shape["data"]
    start, stop = process_rows(mesh, n)
    return source.sample(n, seed)[start:stop]


def sample_rows(source, n: int, seed: int, mesh) -> jax.Array:
    """A deterministic sample of about n rows as a global array sharded over `data` (n rounded
    down so the `data` axis divides it). The on-the-fly feed computes it on the devices."""
    if isinstance(source, OnTheFlyFeed):
        return source.sample(n - n % mesh.shape["data"], seed)
    return global_rows(host_sample(source, n, seed, mesh), mesh)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _write_config(cfg: Config, path: Path) -> None:
    """config.yaml, written atomically: other processes of the run read it concurrently."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    config_lib.save_config(cfg, tmp)
    tmp.replace(path)


def train(cfg: Config, *, quiet: bool = False) -> dict:
    """Train (or resume) the run in cfg.train.run_dir; returns the final summary."""
    config_lib.validate(cfg, jax.device_count())
    t = cfg.train
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_cfg = run_dir / "config.yaml"
    if saved_cfg.exists():
        import yaml
        check_resumable(yaml.safe_load(saved_cfg.read_text()), cfg)
    if jax.process_index() == 0:
        _write_config(cfg, saved_cfg)

    mesh = make_mesh(cfg.mesh)
    # data.source=lm: LM activations harvested into an on-device buffer (saejax.data.onthefly);
    # its batches are a pure function of the step too, so nothing but TrainState is saved.
    source = make_feed(cfg, mesh) if cfg.data.source == "lm" else make_source(cfg)
    contract = StepContract.build(cfg, mesh)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=t.keep_checkpoints,
                        async_save=t.async_checkpointing)
    restored = ckpt.restore_latest(contract.abstract_state())
    if restored is not None:
        start, state, _ = restored
    else:
        start = 0
        state = contract.init(sample_rows(source, INIT_SAMPLE, t.seed, mesh))

    resample_at = set(config_lib.resample_steps(cfg))
    logger = MetricsLogger(
        run_dir, batch_size=t.batch_size, log_every=t.log_every,
        dead_window_steps=-(-t.dead_window_tokens // t.batch_size), total_steps=t.steps,
        start_step=start, tensorboard=t.tensorboard, progress=t.progress and not quiet,
        is_main=jax.process_index() == 0)

    row_start, row_stop = process_rows(mesh, t.batch_size)

    def batch_at(step: int) -> jax.Array:
        return global_rows(source.rows(step, row_start, row_stop, t.batch_size), mesh)

    # The feed dispatches its refills itself (async, in this thread: a thread running ahead
    # would donate the buffer early); a resumed run's first batch rebuilds it from `start`.
    batches = (source.batches(start, t.steps) if isinstance(source, OnTheFlyFeed)
               else Prefetcher(batch_at, start, t.steps))
    meta = {"config": config_lib.to_dict(cfg)}
    in_flight: collections.deque = collections.deque()
    try:
        for step in range(start, t.steps):
            state, metrics = contract.step_fn(state, batches.next())
            in_flight.append(jax.tree.leaves(metrics)[0])  # metrics are not donated, state is
            if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                in_flight.popleft().block_until_ready()
            done = step + 1
            # Logged before resampling, so the record describes the state this step ran with.
            if done % t.log_every == 0 or done == t.steps:
                logger.log(done, metrics, state)
            if done in resample_at:
                x = sample_rows(source, cfg.resample.n_inputs, t.seed * 7919 + done, mesh)
                state, n_dead = contract.resample_fn(state, x)
                logger.write({"step": done, "event": "resample", "n_resampled": int(n_dead)})
            if done % t.checkpoint_every == 0 or done == t.steps:
                bad, finite = to_host((state.nonfinite_step,
                                       _all_finite((state.params, state.opt_state))))
                if bad >= 0:
                    raise NonFiniteLossError(nonfinite_message(bad))
                if not finite:  # a finite loss whose update overflowed: the next loss is NaN
                    raise NonFiniteLossError(f"parameters became NaN/Inf at step {done}")
                ckpt.save(done, state, {**meta, "step": done, "data_position": done})
        ckpt.wait()
        summary = summarize(cfg, contract, state, source, mesh)
        logger.write({"step": t.steps, "event": "summary", **summary})
    except NonFiniteLossError as e:
        ckpt.wait()
        raise NonFiniteLossError(
            f"{e}; stopped without saving. Last good checkpoint: "
            f"{ckpt.latest_step()} in {run_dir / 'checkpoints'}") from None
    finally:
        batches.close()
        ckpt.wait()
        logger.close()
    ckpt.close()
    if not quiet and jax.process_index() == 0:
        print(format_summary(summary))
    return summary


def summarize(cfg: Config, contract: StepContract, state, source, mesh) -> dict:
    """Held-out MSE/FVU/L0, dead fraction over the metrics window, and MMCS for synthetic data."""
    from saejax.eval.metrics import heldout_metrics
    from saejax.train.metrics import dead_fraction

    x = sample_rows(source, EVAL_ROWS, 10_000_019 + cfg.train.seed, mesh)
    out = heldout_metrics(contract.graphdef, state.params, state.input_scale, x)
    window = -(-cfg.train.dead_window_tokens // cfg.train.batch_size)
    step, last_fired = to_host((state.step, state.last_fired))
    out["dead_fraction"] = dead_fraction(int(step), last_fired, window)
    if hasattr(source, "features"):
        from saejax.data.synthetic import mmcs
        out["mmcs"] = mmcs(to_host(state.params["W_dec"]), source.features)
    out["step"] = int(step)
    return out


def format_summary(s: dict) -> str:
    parts = [f"step {s['step']}"]
    if "mmcs" in s:
        parts.append(f"MMCS {s['mmcs']:.4f}")
    parts += [f"L0 {s['l0']:.2f}", f"FVU {s['fvu']:.4f}", f"MSE {s['mse']:.4g}",
              f"dead fraction {s['dead_fraction']:.4f}"]
    return "final (held-out): " + "  ".join(parts)
