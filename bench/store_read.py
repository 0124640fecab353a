"""Read throughput of the activation store against the SAE step's consumption, in one process.

    python bench/store_read.py [--d 512 --mb 256 --batch 4096 --n-features 16384
                                --dtypes float32,bfloat16 --contexts-per-shard 64
                                --reads 30 --steps 2 --warmup 1]

Writes a store of about `--mb` MB of float32 rows per dtype (d=`--d`, contexts of 128 tokens
with BOS dropped, written by `harvest_to_store` from a numpy stand-in for the LM) under a
temporary directory in /tmp, then times `ActivationStore.rows(step, 0, B, B)` over `--reads`
consecutive steps in the shuffled order (float32 out; bfloat16 stores are converted). The
store was just written and fits in memory, so this is the warm page-cache rate (memory-mapped
gather + conversion), not a cold-disk rate. The consumer is the real ReLU SAE train step
(`StepContract.build` on a mesh of all devices, compiled ahead of time, state donated) at
B x d with F features, fed a batch read from the store: its rate is B / (median step time).
Printed: rows/s and GB/s for both, and ratio = read rate / consumption rate (> 1 means one
reading thread keeps up with the step).

With `--url gs://B/P` or `s3://B/P` each store is also harvested into the object store and its
reads timed the same way (byte-range reads, `saejax.objstore.RangeNpy`, no page cache): printed
as its own ratio to the consumption rate and as object store / local; then again through
`SAEJAX_CACHE_DIR` (shards downloaded whole and checked when the store opens, then mapped). `AWS_ENDPOINT_URL` points
s3:// at any S3-compatible server, e.g. a local one:

    python -m moto.server -p 5555 &
    AWS_ENDPOINT_URL=http://127.0.0.1:5555 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x \
        python -c "import boto3; boto3.client('s3', region_name='us-east-1').create_bucket(Bucket='bench')"
    AWS_ENDPOINT_URL=... python bench/store_read.py --url s3://bench/acts --mb 32 --batch 1024
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from saejax.atomic import CACHE_ENV
from saejax.config import Config, validate
from saejax.data.store import ActivationStore
from saejax.data.store_writer import harvest_to_store
from saejax.sharding import make_mesh
from saejax.train.step import StepContract

CTX, VOCAB, BOS = 128, 4096, 0


class Contexts:
    """Random token contexts [n, CTX], each starting with BOS (so one row in CTX is dropped)."""

    def __init__(self, n: int):
        self.tokens = np.random.default_rng(0).integers(1, VOCAB, (n, CTX)).astype(np.int32)
        self.tokens[:, 0] = BOS
        self.ctx_len, self.bos_id = CTX, BOS

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, idx) -> np.ndarray:
        return self.tokens[np.asarray(idx)]


def fake_lm(d: int):
    """Embedding lookup + positions: cheap, deterministic rows of width d."""
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(VOCAB, d)).astype(np.float32)
    pos = rng.normal(size=(CTX, d)).astype(np.float32) * 0.1
    return lambda t: {"site": emb[t] + pos[None]}


def read_rate(src: ActivationStore, batch: int, reads: int) -> float:
    """Seconds per rows(step, 0, B, B) call, median over consecutive steps after one warm-up."""
    src.rows(0, 0, batch, batch)
    times = []
    for step in range(1, reads + 1):
        t0 = time.perf_counter()
        src.rows(step, 0, batch, batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_time(args, x: np.ndarray) -> tuple[float, str]:
    """Median seconds of the real ReLU SAE train step at [B, d] x F on all devices."""
    cfg = Config()
    cfg.sae.arch, cfg.sae.d_in, cfg.sae.n_features = "relu", args.d, args.n_features
    cfg.train.batch_size = args.batch
    validate(cfg, jax.device_count())
    mesh = make_mesh(cfg.mesh)
    c = StepContract.build(cfg, mesh)
    batch = jax.device_put(x, c.batch_sharding)
    state = c.init(batch)
    compiled = c.step_fn.lower(state, batch).compile()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    where = (f"mesh data={mesh.shape['data']} model={mesh.shape['model']} on "
             f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    return statistics.median(times), where


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=512, help="activation width d")
    p.add_argument("--mb", type=float, default=256, help="store size in MB of float32 rows")
    p.add_argument("--batch", type=int, default=4096, help="B, rows per step")
    p.add_argument("--n-features", type=int, default=16384, help="F, SAE dictionary size")
    p.add_argument("--dtypes", default="float32,bfloat16", help="store dtypes to write and read")
    p.add_argument("--contexts-per-shard", type=int, default=64,
                   help="store shard size in contexts (64 x 127 rows: 16 MB float32 at d=512)")
    p.add_argument("--reads", type=int, default=30, help="timed rows() calls per store")
    p.add_argument("--steps", type=int, default=2, help="timed SAE steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed SAE steps after compiling")
    p.add_argument("--url", default=None, help="also write each store under this gs:// or s3:// "
                                               "prefix and time reading it from there")
    p.add_argument("--dir", default=None, help="where to write the stores (default: a new "
                                               "temporary directory in /tmp, removed at the end)")
    args = p.parse_args(argv)
    b, d = args.batch, args.d
    n_ctx = max(1, int(args.mb * 1e6 / (4 * d * (CTX - 1))))
    root = args.dir or tempfile.mkdtemp(prefix="saejax_store_bench_", dir="/tmp")
    contexts, lm = Contexts(n_ctx), fake_lm(d)
    print(f"store: {n_ctx} contexts x {CTX - 1} rows (BOS dropped) = {n_ctx * (CTX - 1):,} rows "
          f"of d={d} | read batch B={b} | {os.cpu_count()} CPU cores | dir {root}")

    results, remote = {}, {}
    try:
        for dtype in args.dtypes.split(","):
            out = os.path.join(root, dtype)
            t0 = time.perf_counter()
            m = harvest_to_store(contexts, lm, out, sites=["site"],
                                 contexts_per_shard=args.contexts_per_shard,
                                 batch_contexts=64, dtype=dtype, overwrite=True,
                                 provenance={"model": "bench fake"})
            t_write = time.perf_counter() - t0
            stored = sum(os.path.getsize(os.path.join(out, s["file"]))
                         for s in m["sites"]["site"]["shards"])
            src = ActivationStore(out, "site", seed=0)
            t_read = read_rate(src, b, args.reads)
            results[dtype] = (src, t_read)
            itemsize = 4 if dtype == "float32" else 2
            print(f"{dtype:>9}: wrote {stored / 1e6:,.0f} MB ({len(m['shards'])} shards) in "
                  f"{t_write:.1f} s "
                  f"({stored / 1e6 / t_write:,.0f} MB/s incl. the fake LM and sha256) | "
                  f"rows(): {t_read * 1e3:.1f} ms per batch = {b / t_read:,.0f} rows/s = "
                  f"{b * d * 4 / t_read / 1e9:.2f} GB/s float32 out "
                  f"({b * d * itemsize / t_read / 1e9:.2f} GB/s of stored bytes)")
            if args.url:
                url = f"{args.url.rstrip('/')}/{dtype}"
                harvest_to_store(contexts, lm, url, sites=["site"],
                                 contexts_per_shard=args.contexts_per_shard, batch_contexts=64,
                                 dtype=dtype, overwrite=True, provenance={"model": "bench fake"})
                remote[dtype] = read_rate(ActivationStore(url, "site", seed=0), b, args.reads)
                print(f"{'':>9}  {url}: rows(): {remote[dtype] * 1e3:.1f} ms per batch = "
                      f"{b / remote[dtype]:,.0f} rows/s")
                os.environ[CACHE_ENV] = os.path.join(root, "cache")  # whole shards, then mmap
                t0 = time.perf_counter()
                cached = ActivationStore(url, "site", seed=0)
                t_open = time.perf_counter() - t0
                t_cached = read_rate(cached, b, args.reads)
                del os.environ[CACHE_ENV]
                print(f"{'':>9}  with {CACHE_ENV}: opened (downloaded and checked) in "
                      f"{t_open:.2f} s, then rows(): {t_cached * 1e3:.1f} ms per batch = "
                      f"{b / t_cached:,.0f} rows/s")

        first = next(iter(results.values()))[0]
        t0 = time.perf_counter()
        t_step, where = step_time(args, first.rows(0, 0, b, b))
        print(f"\nSAE step (relu, B={b}, d={d}, F={args.n_features}, {where}): "
              f"{t_step:.3f} s median of {args.steps} after init+compile+{args.warmup} warm-up "
              f"({time.perf_counter() - t0:.0f} s in all) = {b / t_step:,.0f} rows/s = "
              f"{b * d * 4 / t_step / 1e9:.3f} GB/s float32 consumed")
        print()
        for dtype, (_, t_read) in results.items():
            print(f"{dtype}: ratio = read rate / consumption rate = {b / t_read:,.0f} / "
                  f"{b / t_step:,.0f} rows/s = {t_step / t_read:.1f}")
            if dtype in remote:
                print(f"{dtype} from {args.url}: ratio = read rate / consumption rate = "
                      f"{t_step / remote[dtype]:.3f}; object store / local read rate = "
                      f"{t_read / remote[dtype]:.4f}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
