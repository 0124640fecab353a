"""The SAE training loop: restore or init, step, resample, log, checkpoint, summarise.

The run plumbing (run directory, checkpoints, metrics file, step dispatch, NaN/Inf gate) is
`saejax.train.runner`'s, shared with the LM trainer; data comes from one batch provider
(`saejax.data.make_provider`). Data position is a pure function of the step, and everything
else lives in the checkpointed `TrainState`, so a run restarted from its run directory
continues bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from saejax import config as config_lib
from saejax import sharding
from saejax.config import Config
from saejax.data import make_provider
from saejax.sae.stats import dead_fraction, density_summary, heldout_metrics
from saejax.sharding import make_mesh, to_host
from saejax.train.runner import (MetricsFile, Runner, Throughput, compile_step, due,
                                 prepare_run_dir, read_back, start_record)
from saejax.train.step import StepContract

# Config fields that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = {"train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.async_checkpointing", "train.tensorboard",
                     "train.progress", "train.run_dir", "train.dead_window_tokens",
                     "mesh.data", "mesh.model"}
INIT_SAMPLE = 16_384  # rows for the geometric median / input scale
EVAL_ROWS = 32_768


def resumable_changes(cfg: Config) -> set[str]:
    """RESUMABLE_CHANGES, plus train.steps when the run length shapes nothing (a constant LR and
    resampling at fixed steps): a decaying LR or resampling at fractions of the run would
    silently differ from the run that was started."""
    fixed_length = cfg.optim.decay == "constant" and not cfg.resample.at_fractions
    return RESUMABLE_CHANGES | ({"train.steps"} if fixed_length else set())


def check_resumable(saved: dict, cfg: Config) -> None:
    config_lib.check_same_run(saved, cfg, resumable_changes(cfg), cfg.train.run_dir)


def sample_rows(data, n: int, seed: int, mesh) -> jax.Array:
    """A deterministic sample of about n rows from the batch provider `data`, as a global array
    (n rounded down so the `batch` axis divides it)."""
    return data.sample(n - n % sharding.axis_size(mesh, "batch"), seed)


def dead_window_steps(cfg: Config) -> int:
    return -(-cfg.train.dead_window_tokens // cfg.train.batch_size)


def log_record(step: int, metrics: dict, last_fired: np.ndarray, fire_count: np.ndarray,
               cfg: Config) -> dict:
    """The metrics.jsonl record of log step `step` (from host values): the step's metrics, the
    dead fraction over the dead window, the dense fraction and density histogram of the
    logging window (`saejax.sae.stats`)."""
    t = cfg.train
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    window_tokens = ((step - 1) % t.log_every + 1) * t.batch_size
    record["dead_fraction"] = dead_fraction(step, last_fired, dead_window_steps(cfg))
    record.update(density_summary(fire_count, window_tokens))
    return record


def train(cfg: Config, *, quiet: bool = False) -> dict:
    """Train (or resume) the run in cfg.train.run_dir; returns the final summary."""
    config_lib.validate(cfg, jax.device_count())
    t = cfg.train
    run_dir = Path(t.run_dir)
    prepare_run_dir(run_dir, cfg, resumable_changes(cfg))
    mesh = make_mesh(cfg.mesh)
    data = make_provider(cfg, mesh)
    contract = StepContract.build(cfg, mesh)
    batch = jax.ShapeDtypeStruct((t.batch_size, cfg.sae.d_in), jnp.float32,
                                 sharding=contract.batch_sharding)
    step_fn, memory = compile_step(contract.step_fn, contract.abstract_state(), batch)
    resample_at = set(config_lib.resample_steps(cfg))
    meta = {"config": config_lib.to_dict(cfg)}

    with Runner(run_dir, keep=t.keep_checkpoints, async_save=t.async_checkpointing) as runner:
        restored = runner.restore(contract.abstract_state())
        start, state = ((restored[0], restored[1]) if restored is not None else
                        (0, contract.init(sample_rows(data, INIT_SAMPLE, t.seed, mesh))))
        with MetricsFile(run_dir, start_step=start, total_steps=t.steps,
                         tensorboard=t.tensorboard, progress=t.progress and not quiet) as log:
            if start == 0:
                log.write(start_record(mesh, state.params, t.batch_size, memory))
            clock = Throughput(start, t.batch_size)

            def on_step(done: int, state, metrics: dict):
                # Logged before resampling, so the record describes the state this step ran with.
                if due(done, t.log_every, t.steps):
                    record = log_record(done, *read_back(state, metrics, state.last_fired,
                                                         state.fire_count), cfg)
                    record["tokens_per_s"] = clock.rate(done)
                    log.write(record)
                    log.show(done, loss=f"{record['loss']:.4g}", l0=f"{record['l0']:.1f}",
                             tok_s=f"{record['tokens_per_s']:.3g}")
                if done in resample_at:
                    x = sample_rows(data, cfg.resample.n_inputs, t.seed * 7919 + done, mesh)
                    state, n_dead = contract.resample_fn(state, x)
                    log.write({"step": done, "event": "resample", "n_resampled": int(n_dead)})
                if due(done, t.checkpoint_every, t.steps):
                    runner.save(done, state, meta)
                return state

            state = runner.loop(state, step_fn, data.batches(start, t.steps), start, t.steps,
                                on_step)
            summary = summarize(cfg, contract, state, data, mesh)
            log.write({"step": t.steps, "event": "summary", **summary})
    if not quiet and jax.process_index() == 0:
        print(format_summary(summary))
    return summary


def summarize(cfg: Config, contract: StepContract, state, data, mesh) -> dict:
    """Held-out MSE/FVU/L0, dead fraction over the metrics window, and the data's ground-truth
    metrics (MMCS for synthetic data)."""
    x = sample_rows(data, EVAL_ROWS, 10_000_019 + cfg.train.seed, mesh)
    out = heldout_metrics(contract.graphdef, state.params, state.input_scale, x)
    step, last_fired = to_host((state.step, state.last_fired))
    out["dead_fraction"] = dead_fraction(int(step), last_fired, dead_window_steps(cfg))
    out.update(data.summary_metrics(state.params["W_dec"]))
    out["step"] = int(step)
    return out


def format_summary(s: dict) -> str:
    parts = [f"step {s['step']}"]
    if "mmcs" in s:
        parts.append(f"MMCS {s['mmcs']:.4f}")
    parts += [f"L0 {s['l0']:.2f}", f"FVU {s['fvu']:.4f}", f"MSE {s['mse']:.4g}",
              f"dead fraction {s['dead_fraction']:.4f}"]
    return "final (held-out): " + "  ".join(parts)
