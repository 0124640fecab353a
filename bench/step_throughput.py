"""Throughput of the real train step against the dense matmul rate, measured in one process.

    python bench/step_throughput.py [--batch 4096 --d-in 512 --n-features 16384
                                     --arch relu,topk --steps 3 --warmup 1 --mesh -1,1]

A step is credited with the convention 12·B·d·F FLOPs (6 matmuls of 2·B·d·F: encoder and
decoder forward, and two gradients each). Its FLOP rate is divided by the rate of one jitted
float32 [B,d]@[d,F] matmul on the same devices, sharded like the encoder (rows over `data`,
features over `model`): ratio = step FLOP rate / matmul rate. The 6-matmul chain of the SAE
forward and backward, without the elementwise work, is timed as a second reference.

The step is the real one, `StepContract.build(cfg, mesh)` with its shardings and donation,
compiled ahead of time (`lower().compile()`); its `memory_analysis()` is printed (per device).
References and steps are timed alternately, one call of each per round, to `block_until_ready`,
median over rounds after warm-up, so that load from other processes drifts into all of them. On
CPU the ratio is also given from process CPU time, which other processes' load barely moves.
Real devices only: this file sets no fake device count (it runs under one set in XLA_FLAGS).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from saejax.config import Config, ConfigError, validate
from saejax.sae import FAMILIES, SAE
from saejax.sharding import batch_sharding, make_mesh, named
from saejax.train.step import StepContract


def seconds(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn() up to block_until_ready of its result."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def matmul_refs(mesh: Mesh, b: int, d: int, f: int) -> dict[str, Callable[[], Any]]:
    """The two references, as zero-argument callables on arrays sharded like the step's."""
    key = jax.random.key(0)
    x = jax.device_put(jax.random.normal(key, (b, d)), batch_sharding(mesh))
    w_enc = jax.device_put(jax.random.normal(key, (d, f)) / d**0.5, named(mesh, SAE.AXES["W_enc"]))
    w_dec = jax.device_put(jax.random.normal(key, (f, d)) / f**0.5, named(mesh, SAE.AXES["W_dec"]))

    matmul = jax.jit(lambda x, w: x @ w)

    @jax.jit
    def chain(x, w_enc, w_dec):
        """The 6 matmuls of an SAE step at its shapes, without the elementwise work."""
        pre = x @ w_enc            # encoder forward        [B,d]@[d,F]
        x_hat = pre @ w_dec        # decoder forward        [B,F]@[F,d]
        g_dec = pre.T @ x_hat      # grad W_dec             [F,B]@[B,d]
        g_pre = x_hat @ w_dec.T    # grad through decoder   [B,d]@[d,F]
        g_enc = x.T @ g_pre        # grad W_enc             [d,B]@[B,F]
        g_x = g_pre @ w_enc.T      # grad x (the step needs none) [B,F]@[F,d]
        return g_dec, g_enc, g_x

    return {"matmul": lambda: matmul(x, w_enc), "chain": lambda: chain(x, w_enc, w_dec)}


def mesh_shape(text: str) -> tuple[int, int]:
    """`--mesh data,model`, e.g. `-1,1` (-1 = the remaining devices)."""
    try:
        data, model = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected data,model sizes, got {text!r}") from None
    return data, model


def make_config(args: argparse.Namespace, arch: str) -> Config:
    cfg = Config()
    cfg.sae.arch, cfg.sae.d_in, cfg.sae.n_features = arch, args.d_in, args.n_features
    cfg.train.batch_size = args.batch
    cfg.mesh.data, cfg.mesh.model = args.mesh
    validate(cfg, jax.device_count())
    return cfg


class StepRunner:
    """The compiled step of one arch with its (donated, so carried) state and a fixed batch."""

    def __init__(self, cfg: Config, mesh: Mesh, x: np.ndarray):
        c = StepContract.build(cfg, mesh)
        self.batch = jax.device_put(x, c.batch_sharding)
        self.state = c.init(self.batch)
        self.compiled = c.step_fn.lower(self.state, self.batch).compile()

    def __call__(self) -> Any:
        self.state, metrics = self.compiled(self.state, self.batch)
        return self.state, metrics

    def memory(self) -> dict[str, int] | None:
        m = self.compiled.memory_analysis()
        if m is None:
            return None
        names = ("argument", "output", "alias", "temp", "generated_code")
        return {n: getattr(m, f"{n}_size_in_bytes", 0) for n in names}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096, help="B, activation vectors per step")
    p.add_argument("--d-in", type=int, default=512, help="d, input width")
    p.add_argument("--n-features", type=int, default=16384, help="F, dictionary size")
    p.add_argument("--arch", default="relu,topk", help="comma-separated SAE families")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (one call of each per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after compiling")
    p.add_argument("--mesh", type=mesh_shape, default=(-1, 1),
                   help="data,model mesh sizes (-1 = the rest), default -1,1")
    p.add_argument("--no-chain", action="store_true", help="skip the 6-matmul reference")
    args = p.parse_args(argv)
    archs = args.arch.split(",")
    if unknown := sorted(set(archs) - set(FAMILIES)):
        p.error(f"--arch: unknown {unknown} (known: {sorted(FAMILIES)})")
    b, d, f = args.batch, args.d_in, args.n_features
    flops_mm, flops_step = 2 * b * d * f, 12 * b * d * f

    try:
        cfgs = {a: make_config(args, a) for a in archs}
    except ConfigError as e:
        p.error(str(e))
    mesh = make_mesh(cfgs[archs[0]].mesh)
    print(f"B={b} d_in={d} F={f} float32 | mesh data={mesh.shape['data']} "
          f"model={mesh.shape['model']} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s) | {args.steps} timed rounds after {args.warmup} warm-up")

    refs = matmul_refs(mesh, b, d, f)
    if args.no_chain:
        del refs["chain"]
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(b, d)), 0).astype(np.float32)
    t0 = time.perf_counter()
    runners = {a: StepRunner(cfgs[a], mesh, x) for a in archs}
    print(f"init + compile: {time.perf_counter() - t0:.1f} s")

    jobs = {**refs, **runners}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    cpu: dict[str, list[float]] = {k: [] for k in jobs}
    for i in range(args.warmup + args.steps):
        for name, fn in jobs.items():
            wall, busy = seconds(fn)
            if i >= args.warmup:
                times[name].append(wall)
                cpu[name].append(busy)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    mm_rate = flops_mm / med["matmul"]

    def spread(k: str) -> str:
        return f"{min(times[k]):.3f}-{max(times[k]):.3f}"

    print(f"\n{'reference':<34}{'median s':>10}{'range s':>16}{'GFLOP/s':>10}")
    print(f"{'matmul [B,d]@[d,F] (2·B·d·F)':<34}{med['matmul']:>10.3f}{spread('matmul'):>16}"
          f"{mm_rate / 1e9:>10.1f}")
    if "chain" in med:
        print(f"{'6-matmul chain (12·B·d·F)':<34}{med['chain']:>10.3f}{spread('chain'):>16}"
              f"{flops_step / med['chain'] / 1e9:>10.1f}")

    print(f"\n{'step':<8}{'median s':>10}{'range s':>16}{'tokens/s':>12}{'GFLOP/s':>10}"
          f"{'vs matmul':>11}{'vs chain':>10}")
    for a in archs:
        rate = flops_step / med[a]
        vs_chain = f"{med['chain'] / med[a]:>10.3f}" if "chain" in med else f"{'-':>10}"
        print(f"{a:<8}{med[a]:>10.3f}{spread(a):>16}{b / med[a]:>12,.0f}{rate / 1e9:>10.1f}"
              f"{rate / mm_rate:>11.3f}{vs_chain}")

    print("\ncompiled step memory_analysis (MiB):")
    for a in archs:
        mem = runners[a].memory()
        print(f"  {a}: " + ("not available" if mem is None else
                            "  ".join(f"{k} {v / 2**20:.1f}" for k, v in mem.items())))
    print()
    on_cpu = jax.devices()[0].platform == "cpu"
    for a in archs:
        rate = flops_step / med[a]
        # On a shared CPU host, process CPU time is far less sensitive to other processes' load.
        cpu_ratio = 6 * med_cpu["matmul"] / med_cpu[a]
        work = f"  (from process CPU time: {cpu_ratio:.3f})" if on_cpu else ""
        print(f"{a}: ratio = step FLOP rate / matmul rate = {rate / 1e9:.1f} / "
              f"{mm_rate / 1e9:.1f} GFLOP/s = {rate / mm_rate:.3f}{work}")


if __name__ == "__main__":
    main()
