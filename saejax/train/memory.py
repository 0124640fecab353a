"""A memory estimate of an SAE run from its config alone, checked before anything is compiled.

A dictionary or batch far beyond the devices' memory would otherwise crash inside XLA with a
C++ dump, or swap for minutes with no message. `check_memory` adds up what the run must hold per
device, in float32:

    state       parameters, their gradients and two Adam moments: 4 x (2·d·F + F) / model
    step        the batch [B, d] and its reconstruction over `data`, and three [B, F] arrays
                (pre-activations, f, its gradient) over `data` x `model`
    resampling  every feature's two drawn inputs [F, d] over `model`, one chunk of inputs [c, d]
                and its activations [c, F] (twice)
    evaluation  the held-out sample [N, d] (twice) and the activations [c, F] (twice) of one
                piece of it (`saejax.sae.stats.HELDOUT_CHUNK` rows)
    buffer      data.source=lm: the on-device shuffle buffer [buffer_size, d] over `data`

and needs state + buffer + the largest of the other three. Each term is a lower bound of what
XLA allocates (no temporaries beyond these are counted), and it is compared with the devices'
whole memory (CPU devices: an equal part of the host's), so a run refused here could not run;
one accepted may still be tight. The synthetic source's ground-truth features [n, d] (float64,
plus a copy) are checked against the host's memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from saejax.config import Config, resample_steps
from saejax.errors import ConfigError
from saejax.sae.stats import HELDOUT_CHUNK

F32 = 4


def device_bytes(cfg: Config, n_data: int, n_model: int, *, eval_rows: int,
                 chunk_rows: int, members: int = 1) -> dict[str, int]:
    """{part: bytes per device} of the module docstring for a `n_data` x `n_model` mesh, with
    `members` SAEs of a sweep group per device (state, step and resampling scale with them)."""
    d, F, B, M = cfg.sae.d_in, cfg.sae.n_features, cfg.train.batch_size, members
    over_data, over_both = 1 / n_data, 1 / (n_data * n_model)
    parts = {
        "parameters, gradients and Adam moments": M * 4 * ((2 * d * F + F) / n_model + d),
        "step activations": (1 + M) * B * d * over_data + M * 3 * B * F * over_both,
        "evaluation": (2 * eval_rows * d * over_data
                       + 2 * min(eval_rows, HELDOUT_CHUNK) * F * over_both),
    }
    if resample_steps(cfg):
        c = min(chunk_rows, cfg.resample.n_inputs)
        parts["resampling"] = M * (2 * F * d / n_model + 2 * c * F * over_both) + c * d * over_data
    if cfg.data.source == "lm":
        parts["activation buffer"] = cfg.data.buffer_size * d * over_data
    return {k: int(v * F32) for k, v in parts.items()}


PERSISTENT = ("parameters, gradients and Adam moments", "activation buffer")
"""The parts held throughout; the others are held one at a time."""


def peak(parts: dict[str, int]) -> int:
    """Bytes per device at the peak: the persistent parts plus the largest of the others."""
    transient = [v for k, v in parts.items() if k not in PERSISTENT]
    return sum(parts.get(k, 0) for k in PERSISTENT) + max(transient, default=0)


def host_memory() -> int:
    """Bytes of the host's memory: MemTotal of /proc/meminfo (else the physical pages), at most
    a cgroup's memory limit when one is set. The total, not what is free now: the check refuses
    what could never fit, not what other processes crowd out for a while."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2 limit ("max" does not parse)
        pass
    return total


def device_memory() -> tuple[int, str]:
    """(bytes of memory of each local device, a description of the devices). Accelerators
    report their own (what XLA may allocate); CPU devices share the host's, an equal part each."""
    devices = jax.local_devices()
    stats = devices[0].memory_stats()
    name = f"{len(devices)} {devices[0].platform} device{'s' * (len(devices) > 1)}"
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]), name
    return host_memory() // len(devices), name


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_memory(cfg: Config, n_data: int, n_model: int, *, eval_rows: int,
                 chunk_rows: int, members: int = 1) -> None:
    """Refuse (ConfigError with the numbers and what to change) a run whose estimate exceeds
    the memory of its devices, or whose synthetic features exceed the host's."""
    parts = device_bytes(cfg, n_data, n_model, eval_rows=eval_rows, chunk_rows=chunk_rows,
                         members=members)
    need = peak(parts)
    have, devices = device_memory()
    if need > have:
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())
        raise ConfigError(
            f"sae.n_features={cfg.sae.n_features}, sae.d_in={cfg.sae.d_in}, "
            f"train.batch_size={cfg.train.batch_size} need about {_gib(need)} per device "
            f"({detail}) but each of the {devices} has {_gib(have)}: lower them, or spread "
            f"the run over more devices (mesh.model shards the dictionary, mesh.data the batch)")
    if cfg.data.source == "synthetic":
        need = cfg.data.n_true_features * cfg.sae.d_in * 16
        if need > (have := host_memory()):
            raise ConfigError(
                f"data.n_true_features={cfg.data.n_true_features} x sae.d_in={cfg.sae.d_in} "
                f"synthetic features need about {_gib(need)} of host memory but the host has "
                f"{_gib(have)}: lower data.n_true_features")
