"""Throughput of the real train step against the matmul rate, measured in one process.

    python bench/step_throughput.py [--batch 4096 --d-in 512 --n-features 16384
                                     --arch relu,topk --dtype float32,bfloat16
                                     --decode dense,sparse --steps 3 --warmup 1 --mesh -1,1
                                     --json out.json]

One step per (arch, dtype, decode): `--dtype` sets `sae.compute_dtype`; `--decode` sets
`sae.topk.path` for the families that have it (TopK: dense [B,F] codes or sparse values and
indices) and is "-" for the others. A step is credited with the convention 12·B·d·F FLOPs
(6 matmuls of 2·B·d·F: encoder and decoder forward, and two gradients each), whatever it
really computes (a sparse TopK step does far less). Its FLOP rate is divided by the rate of one
jitted [B,d]@[d,F] matmul *in the step's dtype* on the same devices, sharded like the encoder
(rows over `data`, features over `model`): float32 inputs at JAX's default precision (TF32 on
NVIDIA GPUs), or bfloat16 inputs accumulated in float32 with a bfloat16 result, as the encoder
under `saejax.sae.precision`. `vs matmul` = step FLOP rate / that rate. The 6-matmul chain of
the SAE forward and backward, without the elementwise work, is timed per dtype as a second
reference (`vs chain`).

The step is the real one, `StepContract.build(cfg, mesh)` with its shardings and donation,
compiled ahead of time (`lower().compile()`); its `memory_analysis()` temporaries are printed
(per device). References and steps are timed alternately, one call of each per round, to
`block_until_ready`, median over rounds after warm-up, so that load from other processes drifts
into all of them. On CPU the ratio is also given from process CPU time, which other processes'
load barely moves. `--json` writes every figure for bench/gpu.sh. Real devices only: this file
sets no fake device count (it runs under one set in XLA_FLAGS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from saejax.config import Config, ConfigError, validate
from saejax.sae import FAMILIES, SAE, get_family
from saejax.sae import precision
from saejax.sae.config import TopKConfig
from saejax.sharding import batch_sharding, make_mesh, named
from saejax.train.step import StepContract

SHORT = {"float32": "f32", "bfloat16": "bf16"}


def seconds(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn() up to block_until_ready of its result."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def matmul_refs(mesh: Mesh, b: int, d: int, f: int, dtype: str,
                chain: bool) -> dict[str, Callable[[], Any]]:
    """The references in `dtype`, as zero-argument callables on arrays sharded like the step's
    (inputs already in `dtype`, so only the products are timed)."""
    dt = jnp.dtype(precision.DTYPES[dtype])
    key = jax.random.key(0)
    x = jax.device_put(jax.random.normal(key, (b, d)).astype(dt), batch_sharding(mesh))
    w_enc = jax.device_put((jax.random.normal(key, (d, f)) / d**0.5).astype(dt),
                           named(mesh, SAE.AXES["W_enc"]))
    w_dec = jax.device_put((jax.random.normal(key, (f, d)) / f**0.5).astype(dt),
                           named(mesh, SAE.AXES["W_dec"]))

    def mm(a, b):  # the encoder's product: result in dt, accumulated in float32
        return precision.matmul(a, b, dt)

    matmul = jax.jit(mm)

    @jax.jit
    def six(x, w_enc, w_dec):
        """The 6 matmuls of an SAE step at its shapes, without the elementwise work."""
        pre = mm(x, w_enc)          # encoder forward        [B,d]@[d,F]
        x_hat = mm(pre, w_dec)      # decoder forward        [B,F]@[F,d]
        g_dec = mm(pre.T, x_hat)    # grad W_dec             [F,B]@[B,d]
        g_pre = mm(x_hat, w_dec.T)  # grad through decoder   [B,d]@[d,F]
        g_enc = mm(x.T, g_pre)      # grad W_enc             [d,B]@[B,F]
        g_x = mm(g_pre, w_enc.T)    # grad x (the step needs none) [B,F]@[F,d]
        return g_dec, g_enc, g_x

    refs = {f"matmul {SHORT[dtype]}": lambda: matmul(x, w_enc)}
    if chain:
        refs[f"chain {SHORT[dtype]}"] = lambda: six(x, w_enc, w_dec)
    return refs


def mesh_shape(text: str) -> tuple[int, int]:
    """`--mesh data,model`, e.g. `-1,1` (-1 = the remaining devices)."""
    try:
        data, model = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected data,model sizes, got {text!r}") from None
    return data, model


@dataclasses.dataclass(frozen=True)
class Variant:
    arch: str
    dtype: str
    decode: str  # "dense" / "sparse" for families with `sae.topk.path`, else "-"

    @property
    def name(self) -> str:
        return " ".join(p for p in (self.arch, SHORT[self.dtype], self.decode) if p != "-")


def has_decode_option(arch: str) -> bool:
    """Whether `sae.topk.path` exists and this family reads the topk section."""
    family = get_family(arch)
    return ("path" in {f.name for f in dataclasses.fields(TopKConfig)}
            and "topk" in (family.name, *family.sections))


def variants(archs: list[str], dtypes: list[str], decodes: list[str]) -> list[Variant]:
    return [Variant(a, t, d) for a in archs for t in dtypes
            for d in (decodes if has_decode_option(a) else ["-"])]


def make_config(args: argparse.Namespace, v: Variant) -> Config:
    cfg = Config()
    cfg.sae.arch, cfg.sae.d_in, cfg.sae.n_features = v.arch, args.d_in, args.n_features
    cfg.sae.compute_dtype = v.dtype
    cfg.sae.topk.k = args.k
    if v.decode != "-":
        cfg.sae.topk.path = v.decode
    cfg.train.batch_size = args.batch
    cfg.mesh.data, cfg.mesh.model = args.mesh
    validate(cfg, jax.device_count())
    return cfg


class StepRunner:
    """The compiled step of one variant with its (donated, so carried) state and a fixed batch."""

    def __init__(self, cfg: Config, mesh: Mesh, x: np.ndarray):
        c = StepContract.build(cfg, mesh)
        self.batch = jax.device_put(x, c.batch_sharding)
        self.state = c.init(self.batch)
        self.compiled = c.step_fn.lower(self.state, self.batch).compile()

    def __call__(self) -> Any:
        self.state, metrics = self.compiled(self.state, self.batch)
        return self.state, metrics

    def memory(self) -> dict[str, int] | None:
        try:
            m = self.compiled.memory_analysis()
        except Exception:  # not every backend implements it
            m = None
        if m is None:
            return None
        names = ("argument", "output", "alias", "temp", "generated_code")
        return {n: int(getattr(m, f"{n}_size_in_bytes", 0)) for n in names}


def parse_list(text: str, known: list[str], flag: str, p: argparse.ArgumentParser) -> list[str]:
    items = text.split(",")
    if unknown := sorted(set(items) - set(known)):
        p.error(f"{flag}: unknown {unknown} (known: {known})")
    return items


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096, help="B, activation vectors per step")
    p.add_argument("--d-in", type=int, default=512, help="d, input width")
    p.add_argument("--n-features", type=int, default=16384, help="F, dictionary size")
    p.add_argument("--k", type=int, default=32, help="TopK: active latents per token")
    p.add_argument("--arch", default="relu,topk", help="comma-separated SAE families")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated sae.compute_dtype values: float32,bfloat16")
    p.add_argument("--decode", default="dense,sparse",
                   help="comma-separated sae.topk.path values for TopK: dense,sparse")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (one call of each per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after compiling")
    p.add_argument("--mesh", type=mesh_shape, default=(-1, 1),
                   help="data,model mesh sizes (-1 = the rest), default -1,1")
    p.add_argument("--no-chain", action="store_true", help="skip the 6-matmul reference")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    archs = parse_list(args.arch, sorted(FAMILIES), "--arch", p)
    dtypes = parse_list(args.dtype, list(precision.DTYPES), "--dtype", p)
    decodes = parse_list(args.decode, ["dense", "sparse"], "--decode", p)
    if not any(has_decode_option(a) for a in FAMILIES):
        print("note: sae.topk.path does not exist in this checkout: no --decode column")
    b, d, f = args.batch, args.d_in, args.n_features
    flops_mm, flops_step = 2 * b * d * f, 12 * b * d * f
    todo = variants(archs, dtypes, decodes)

    try:
        cfgs = {v: make_config(args, v) for v in todo}
    except ConfigError as e:
        p.error(str(e))
    mesh = make_mesh(cfgs[todo[0]].mesh)
    platform = jax.devices()[0].platform
    print(f"B={b} d_in={d} F={f} k={args.k} | mesh data={mesh.shape['data']} "
          f"model={mesh.shape['model']} on {jax.device_count()} {platform} device(s) "
          f"({jax.devices()[0].device_kind}) | jax {jax.__version__} | {args.steps} timed "
          f"rounds after {args.warmup} warm-up")

    refs: dict[str, Callable[[], Any]] = {}
    for t in dtypes:
        refs.update(matmul_refs(mesh, b, d, f, t, chain=not args.no_chain))
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(b, d)), 0).astype(np.float32)
    t0 = time.perf_counter()
    runners, failed = {}, {}
    for v in todo:
        try:
            runners[v.name] = StepRunner(cfgs[v], mesh, x)
        except Exception as e:  # one broken variant must not cost a whole device session
            failed[v.name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            print(f"  FAILED {v.name}: {failed[v.name]}", flush=True)
            continue
        print(f"  compiled {v.name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"init + compile: {time.perf_counter() - t0:.1f} s")
    todo = [v for v in todo if v.name in runners]

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
    unit, scale = ("GFLOP/s", 1e9) if platform == "cpu" else ("TFLOP/s", 1e12)

    def spread(k: str) -> str:
        return f"{min(times[k]):.4f}-{max(times[k]):.4f}"

    print(f"\n{'reference':<34}{'median s':>10}{'range s':>18}{unit:>10}")
    for name in refs:
        flops = flops_mm if name.startswith("matmul") else flops_step
        what = "[B,d]@[d,F] (2·B·d·F)" if name.startswith("matmul") else "6 matmuls (12·B·d·F)"
        print(f"{name + ' ' + what:<34}{med[name]:>10.4f}{spread(name):>18}"
              f"{flops / med[name] / scale:>10.1f}")

    results = {"shape": {"batch": b, "d_in": d, "n_features": f, "k": args.k},
               "platform": platform, "device_kind": jax.devices()[0].device_kind,
               "devices": jax.device_count(), "jax": jax.__version__,
               "references": {k: {"seconds": med[k],
                                  "flop_rate": (flops_mm if k.startswith("matmul")
                                                else flops_step) / med[k]} for k in refs},
               "steps": {}, "failed": failed}
    print(f"\n{'step':<18}{'median s':>10}{'range s':>18}{'tokens/s':>13}{unit:>10}"
          f"{'matmul ' + unit:>16}{'vs matmul':>11}{'vs chain':>10}{'temp MiB':>11}")
    for v in todo:
        name, tag = v.name, SHORT[v.dtype]
        rate = flops_step / med[name]
        mm_rate = flops_mm / med[f"matmul {tag}"]
        chain = f"chain {tag}"
        vs_chain = med[chain] / med[name] if chain in med else None
        mem = runners[name].memory()
        temp = None if mem is None else mem["temp"]
        print(f"{name:<18}{med[name]:>10.4f}{spread(name):>18}{b / med[name]:>13,.0f}"
              f"{rate / scale:>10.1f}{mm_rate / scale:>16.1f}{rate / mm_rate:>11.3f}"
              + (f"{vs_chain:>10.3f}" if vs_chain is not None else f"{'-':>10}")
              + (f"{temp / 2**20:>11.1f}" if temp is not None else f"{'-':>11}"))
        results["steps"][name] = {
            "arch": v.arch, "dtype": v.dtype, "decode": v.decode, "seconds": med[name],
            "range": [min(times[name]), max(times[name])], "flop_rate": rate,
            "matmul_rate": mm_rate, "vs_matmul": rate / mm_rate, "vs_chain": vs_chain,
            "cpu_vs_matmul": 6 * med_cpu[f"matmul {tag}"] / med_cpu[name],
            "memory": mem}

    print("\ncompiled step memory_analysis (MiB per device):")
    for v in todo:
        mem = runners[v.name].memory()
        print(f"  {v.name}: " + ("not available" if mem is None else
                                 "  ".join(f"{k} {n / 2**20:.1f}" for k, n in mem.items())))
    print()
    for v in todo:
        s = results["steps"][v.name]
        # On a shared CPU host, process CPU time is far less sensitive to other processes' load.
        work = (f"  (from process CPU time: {s['cpu_vs_matmul']:.3f})" if platform == "cpu"
                else "")
        print(f"{v.name}: ratio = step FLOP rate / {SHORT[v.dtype]} matmul rate = "
              f"{s['flop_rate'] / scale:.1f} / {s['matmul_rate'] / scale:.1f} {unit} = "
              f"{s['vs_matmul']:.3f}{work}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
