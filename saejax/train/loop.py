"""The SAE training loop: restore or init, step, resample, log, checkpoint, summarise.

The run plumbing (run directory, checkpoints, metrics file, step dispatch, NaN/Inf gate) is
`saejax.train.runner`'s, shared with the LM trainer; data comes from one batch provider
(`saejax.data.make_provider`). Data position is a pure function of the step, and everything
else lives in the checkpointed `TrainState`, so a run restarted from its run directory
continues bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from saejax import config as config_lib
from saejax import sharding
from saejax.config import Config, ConfigError
from saejax.data import make_provider, relocated, with_absolute_paths
from saejax.sae import get_family
from saejax.sae.stats import dead_fraction, density_summary, heldout_metrics
from saejax.sharding import make_mesh, to_host
from saejax.train.runner import (MetricsFile, Runner, Throughput, all_finite, compile_step, due,
                                 prepare_run_dir, read_back, start_record)
from saejax.train import state as state_lib
from saejax.train.memory import check_memory
from saejax.train.resample import CHUNK, resample
from saejax.train.step import StepContract

# Config fields that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = {"train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.async_checkpointing", "train.tensorboard",
                     "train.progress", "train.run_dir", "train.dead_window_tokens",
                     "mesh.data", "mesh.model"}
INIT_SAMPLE = 16_384  # rows for the geometric median / input scale
EVAL_ROWS = 32_768


def resumable_changes(cfg: Config) -> set[str]:
    """RESUMABLE_CHANGES, plus train.steps when the run's length shapes nothing it computes: a
    constant LR, no resampling at fractions of the run, and hyperparameters (λ warm-up, dead
    windows) that are not fractions of the run. Otherwise a longer run would silently differ
    from the run that was started."""
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                steps=2 * cfg.train.steps))
    resamples = bool(config_lib.resample_steps(cfg))
    now, then = state_lib.hparams(cfg), state_lib.hparams(longer)
    same_hparams = all(float(now[k]) == float(then[k]) for k in now
                       if resamples or not k.startswith("resample_"))
    fixed_length = (cfg.optim.decay == "constant" and same_hparams
                    and not (cfg.resample.at_fractions and resamples))
    return RESUMABLE_CHANGES | ({"train.steps"} if fixed_length else set())


def recorded_view(run_dir: Path):
    """How a run's recorded config is compared with a command's: data paths absolute, and found
    again next to the run directory when it moved with its data."""
    def view(tree: dict) -> dict:
        cfg = config_lib.from_dict(Config, tree)
        return config_lib.to_dict(with_absolute_paths(relocated(cfg, run_dir)))
    return view


def check_resumable(saved: dict, cfg: Config) -> None:
    """Refuse `cfg` for the run whose saved config is `saved`, as `train` would on resume."""
    view = recorded_view(Path(cfg.train.run_dir))
    config_lib.check_same_run(view(saved), view(config_lib.to_dict(cfg)), resumable_changes(cfg),
                              cfg.train.run_dir)


def sample_rows(data, n: int, seed: int, mesh) -> jax.Array:
    """A deterministic sample of about n rows from the batch provider `data`, as a global array
    (n rounded down so the `batch` axis divides it)."""
    return data.sample(n - n % sharding.axis_size(mesh, "batch"), seed)


def init_from_data(contract: StepContract, data, cfg: Config, mesh):
    """A fresh state, initialised from a data sample (input scale, geometric median); refused
    when that made it NaN/Inf: the data holds NaN/Inf values, and every loss would be NaN."""
    state = contract.init(sample_rows(data, INIT_SAMPLE, cfg.train.seed, mesh))
    if not all_finite(state):
        raise ConfigError(f"data.source={cfg.data.source}: the data holds NaN or Inf values (the "
                          f"SAE initialised from {INIT_SAMPLE} sampled rows is not finite)")
    return state


def resample_chunks(data, cfg: Config, seed: int, mesh):
    """About resample.n_inputs rows for a resampling event, one chunk at a time (drawn only as
    the resampler asks: never all at once, and not at all when no feature is dead)."""
    n = cfg.resample.n_inputs
    chunk = min(CHUNK, n)
    for i in range(-(-n // chunk)):
        yield sample_rows(data, chunk, seed * 1009 + i, mesh)


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
    check_memory(cfg, *config_lib.resolve_mesh_shape(cfg.mesh, jax.device_count()),
                 eval_rows=EVAL_ROWS, chunk_rows=CHUNK)
    mesh = make_mesh(cfg.mesh)
    data = make_provider(cfg, mesh)  # a data path or shape at fault is refused before any write
    prepare_run_dir(run_dir, cfg, resumable_changes(cfg), view=recorded_view(run_dir))
    contract = StepContract.build(cfg, mesh)
    batch = jax.ShapeDtypeStruct((t.batch_size, cfg.sae.d_in), data.batch_dtype,
                                 sharding=contract.batch_sharding)
    step_fn, memory = compile_step(contract.step_fn, contract.abstract_state(), batch)
    resample_at = set(config_lib.resample_steps(cfg))
    meta = {"config": config_lib.to_dict(cfg)}

    with Runner(run_dir, keep=t.keep_checkpoints, async_save=t.async_checkpointing) as runner:
        restored = runner.restore(contract.abstract_state())
        start, state = ((restored[0], restored[1]) if restored is not None else
                        (0, init_from_data(contract, data, cfg, mesh)))
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
                    chunks = resample_chunks(data, cfg, t.seed * 7919 + done, mesh)
                    state, n_dead = resample(contract, state, chunks)
                    log.write({"step": done, "event": "resample", "n_resampled": n_dead})
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
    sae_cfg, params = get_family(cfg.sae.arch).for_inference(cfg.sae, state.params,
                                                             state.family_state)
    graphdef = (contract.graphdef if sae_cfg is cfg.sae
                else get_family(sae_cfg.arch).graphdef(sae_cfg))
    out = heldout_metrics(graphdef, params, state.input_scale, x)
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
