"""Host-side metrics: what is read back on log steps, and where it is written.

Only `MetricsLogger.log` pulls values from the device, and only on log steps. Sparsity statistics
come from the per-feature records in `TrainState` (last step fired, firings in the window).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

DENSITY_BINS = np.linspace(-8, 0, 33)  # log10 feature density, the paper's histogram axis
DENSE_THRESHOLD = 0.01  # a feature firing on more than 1% of tokens counts as dense


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the run stopped without saving the bad state."""


def nonfinite_message(nonfinite_step: int) -> str:
    """The error text for `TrainState.nonfinite_step` (the 0-based index of the bad step), naming
    the step as metrics.jsonl and checkpoints count steps (from 1: "step n" = n steps done)."""
    return f"loss became NaN/Inf at step {int(nonfinite_step) + 1}"


def to_host(tree):
    """`jax.device_get` that also works in multi-process runs for arrays sharded over devices of
    other processes (e.g. per-feature records when the `model` axis spans processes): those are
    all-gathered first. A collective then, so every process must call it (they all log)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)
    return jax.tree.map(one, tree)


def density_summary(fire_count: np.ndarray, tokens: int) -> dict:
    """Dense fraction and log10-density histogram from per-feature firing counts over `tokens`."""
    density = fire_count / max(tokens, 1)
    nonzero = density[density > 0]
    counts, _ = np.histogram(np.log10(nonzero), bins=DENSITY_BINS)
    return {
        "dense_fraction": float(np.mean(density > DENSE_THRESHOLD)),
        "density_hist": {"log10_edges": DENSITY_BINS.tolist(), "counts": counts.tolist(),
                         "zero": int(np.sum(density == 0))},
    }


def dead_fraction(step: int, last_fired: np.ndarray, window_steps: int) -> float:
    """Fraction of features that have not fired in the last `window_steps` steps."""
    return float(np.mean(step - last_fired >= window_steps))


class MetricsLogger:
    """metrics.jsonl (+ optional TensorBoard) and a tokens/s progress bar."""

    def __init__(self, run_dir: Path, *, batch_size: int, log_every: int, dead_window_steps: int,
                 total_steps: int, start_step: int, tensorboard: bool, progress: bool,
                 is_main: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.batch_size, self.log_every = batch_size, log_every
        self.dead_window_steps = dead_window_steps
        self.is_main = is_main
        self._truncate_after(start_step)  # a resumed run rewrites what follows its checkpoint
        self.tb = None
        if tensorboard and is_main:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = None
        if progress and is_main:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last = (start_step, time.perf_counter())

    def _truncate_after(self, step: int) -> None:
        """Drop what a resumed run will write again: records after its checkpoint, the final
        summary (re-written at the end), and a last line cut short by a killed process."""
        if not self.is_main or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial line: the process died while appending it
            if record["step"] <= step and record.get("event") != "summary":
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict, state) -> dict:
        """Read back this step's metrics and the sparsity records; write and return them."""
        metrics, last_fired, fire_count, bad = to_host(
            (metrics, state.last_fired, state.fire_count, state.nonfinite_step))
        if bad >= 0:
            raise NonFiniteLossError(nonfinite_message(bad))
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        window_tokens = ((step - 1) % self.log_every + 1) * self.batch_size
        record["dead_fraction"] = dead_fraction(step, last_fired, self.dead_window_steps)
        record.update(density_summary(fire_count, window_tokens))
        last_step, last_t = self._last
        now = time.perf_counter()
        record["tokens_per_s"] = (step - last_step) * self.batch_size / max(now - last_t, 1e-9)
        self._last = (step, now)
        self.write(record)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", l0=f"{record['l0']:.1f}",
                                 tok_s=f"{record['tokens_per_s']:.3g}")
        return record

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
