"""How long SAE training waits for on-the-fly LM activations (saejax.data.onthefly), in one process.

    python bench/onthefly_stall.py [--ctx 128 --batch 4096 --n-features 4096 --buffer 65536
                                    --blocks 8 --lm-batch 64 --steps 8 --rounds 4
                                    --shuffle blocks,global]

LM: the Towards Monosemanticity one-layer model's shape (transformers GPT2Config n_layer=1,
n_embd=128, n_head=4, n_inner=512, ReLU; random weights; vocabulary `--vocab`), hook site
blocks.0.mlp.hook_post (d=512), random token contexts of `--ctx` tokens, each starting with BOS
(dropped). SAE: the real ReLU train step (`StepContract.build`, compiled ahead of time, state
donated) at B x d with F features, on a mesh of all devices. The feed (`OnTheFlyFeed.from_lm`)
holds `--buffer` rows (two harvests of H = buffer/2 rows, S = H/B steps each).

Each round times, ending each with block_until_ready:
  fixed   N SAE steps on one fixed batch;
  fed     N SAE steps fed by feed.batch(step), from a cycle start, so N/S refills are among
          them (a refill: LM forward over the harvest's contexts, write, shuffle);
  refill  the same number of refills alone, on a second feed, for each `--shuffle` kind;
  serve   the N batch slices alone.
Both step loops keep at most 3 steps in flight, as saejax.train.loop does; fixed and fed
alternate which goes first. Printed, as medians of per-round ratios, from wall time and from
process CPU time (all threads; other jobs' load barely changes it, but it cannot see idle
waiting): data-wait fraction = (fed - fixed) / fed; the refill share expected if refills and
steps simply take turns on the device = refill / (fixed + refill); host overhead = (fed - fixed -
refill) / fed, what feeding adds beyond the refills' own compute (~0 when dispatch runs ahead).
Also LM tokens/s and harvested rows/s from the refill timing. Wall times on a CPU host shared
with other jobs vary 2-3x; compare ratios within one run. Fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) share the same cores, so the blocks-vs-
global shuffle comparison only means something on real devices (on one device neither moves
data between devices; on several, "global" all-gathers the harvest to every device and
"blocks" does one all-to-all).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import jax
import numpy as np

from saejax.config import Config, validate
from saejax.data.onthefly import OnTheFlyFeed
from saejax.lm import init_lm
from saejax.lm.gpt2 import config_from_hf
from saejax.sharding import make_mesh
from saejax.train.step import StepContract

SITE = "blocks.0.mlp.hook_post"
IN_FLIGHT = 3


def one_layer_lm(ctx: int, vocab: int):
    from transformers import GPT2Config

    hf = GPT2Config(n_layer=1, n_embd=128, n_head=4, n_inner=512, activation_function="relu",
                    n_positions=ctx, vocab_size=vocab)
    return init_lm(config_from_hf(hf), seed=0)


def run_steps(step_fn, state, next_batch, n):
    """n steps with at most IN_FLIGHT dispatched beyond the newest finished one."""
    in_flight = collections.deque()
    t0 = time.perf_counter()
    for _ in range(n):
        state, metrics = step_fn(state, next_batch())
        in_flight.append(jax.tree.leaves(metrics)[0])
        if len(in_flight) > IN_FLIGHT:
            in_flight.popleft().block_until_ready()
    jax.block_until_ready(state)
    return state, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ctx", type=int, default=128, help="tokens per context")
    p.add_argument("--vocab", type=int, default=50257, help="LM vocabulary size")
    p.add_argument("--batch", type=int, default=4096, help="B, rows per SAE step")
    p.add_argument("--n-features", type=int, default=4096, help="F, SAE dictionary size")
    p.add_argument("--buffer", type=int, default=65536, help="rows in the on-device buffer (2H)")
    p.add_argument("--blocks", type=int, default=8, help="buffer blocks V (multiple of devices)")
    p.add_argument("--lm-batch", type=int, default=64, help="max contexts per LM call")
    p.add_argument("--steps", type=int, default=8, help="N, timed SAE steps per round "
                                                         "(a multiple of S = buffer/2/batch)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (medians are printed)")
    p.add_argument("--shuffle", default="blocks,global", help="shuffle kinds to time refills "
                                                              "of (the first feeds the steps)")
    args = p.parse_args(argv)
    kinds = args.shuffle.split(",")
    t_start = time.perf_counter()

    cfg = Config()
    cfg.sae.arch, cfg.sae.d_in, cfg.sae.n_features = "relu", 512, args.n_features
    cfg.train.batch_size = args.batch
    cfg.train.steps = 10**6
    cfg.resample.enabled = False
    validate(cfg, jax.device_count())
    mesh = make_mesh(cfg.mesh)
    lm = one_layer_lm(args.ctx, args.vocab)
    n_ctx = 20_000
    tokens = np.random.default_rng(0).integers(1, args.vocab, (n_ctx, args.ctx), dtype=np.int32)
    tokens[:, 0] = 0

    def make_feed(kind):
        return OnTheFlyFeed.from_lm(lm, SITE, tokens, mesh, batch_size=args.batch,
                                    buffer_size=args.buffer, blocks=args.blocks,
                                    lm_batch_contexts=args.lm_batch, bos_id=0, shuffle=kind)

    feed = make_feed(kinds[0])
    g = feed.geometry
    S, N = g.steps_per_harvest, args.steps
    if N % S:
        raise SystemExit(f"--steps {N} must be a multiple of S = buffer/2/batch = {S}")
    print(f"LM: 1 layer, d_model 128, d_mlp 512 (ReLU), ctx {args.ctx}, vocab {args.vocab} | "
          f"site {SITE} | SAE relu B={args.batch} d=512 F={args.n_features} | buffer "
          f"{args.buffer} rows = 2 x H={g.half} ({args.buffer * 512 * 4 / 2**20:.0f} MiB f32), "
          f"V={g.blocks} blocks, S={S} steps per harvest | LM {g.lm_tokens_per_harvest:,} tokens "
          f"per harvest ({g.n_chunks} calls of {g.blocks * g.contexts_per_chunk} contexts; "
          f"{feed.describe()['lm_overhead']:.1%} more tokens than rows) | mesh "
          f"data={mesh.shape['data']} model={mesh.shape['model']} on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), {os.cpu_count()} CPU cores")

    contract = StepContract.build(cfg, mesh)
    state = contract.init(feed.sample(16_384, seed=0))
    fixed = feed.sample(args.batch, seed=1)
    step_fn = contract.step_fn.lower(state, fixed).compile()
    # warm-up: compile serve/refill, one step of each loop; position the feed before a cycle
    s0 = S // 2 + S  # a cycle start (cycle 2)
    feed.batch(s0 - 1)
    state, _ = run_steps(step_fn, state, lambda: fixed, 1)
    refill_feeds = {k: make_feed(k) for k in kinds}
    for f in refill_feeds.values():
        f.seek(0)
        jax.block_until_ready(f.state())
    tok, off = feed._pending[g.newest(s0)]  # the next refill's inputs, already on device
    mem = feed._refill.lower(feed.params, feed.state().slots, tok, off,
                             np.int32(0)).compile().memory_analysis()
    if mem is not None:
        print(f"refill memory per device: arguments {mem.argument_size_in_bytes / 2**20:.0f} "
              f"MiB (buffer donated: alias {mem.alias_size_in_bytes / 2**20:.0f} MiB), "
              f"temporaries {mem.temp_size_in_bytes / 2**20:.0f} MiB")

    # per round: (wall, process CPU) seconds of each measurement; fixed/fed order alternates
    rows = {"fixed": [], "fed": [], **{f"refill {k}": [] for k in kinds}, "serve": []}
    step, harvest = s0, 1

    def fed_batch():
        nonlocal step
        step += 1
        return feed.batch(step - 1)

    def timed(fn):
        c0 = time.process_time()
        out, wall = fn()
        return out, (wall, time.process_time() - c0)

    for r in range(args.rounds):
        order = ("fixed", "fed") if r % 2 == 0 else ("fed", "fixed")
        for name in order:
            state, t = timed(lambda: run_steps(step_fn, state,
                                               (lambda: fixed) if name == "fixed" else fed_batch,
                                               N))
            rows[name].append(t)
        for k, f in refill_feeds.items():
            def refills():
                t0 = time.perf_counter()
                for h in range(harvest, harvest + N // S):
                    f._harvest(h)  # what batch() dispatches at a cycle start
                jax.block_until_ready(f.state())
                return None, time.perf_counter() - t0
            rows[f"refill {k}"].append(timed(refills)[1])

        def serves():  # the N batch slices alone (no SAE step, no refill)
            f = refill_feeds[kinds[0]]
            t0 = time.perf_counter()
            out = [f._serve(f.state().slots, np.int32(s))[0] for s in range(s0, s0 + N)]
            jax.block_until_ready(out)
            return None, time.perf_counter() - t0
        rows["serve"].append(timed(serves)[1])
        harvest += N // S
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1][0]:.2f} s ({v[-1][1]:.1f} s CPU)"
                                             for k, v in rows.items()), flush=True)

    n_refills = N // S
    print(f"\nmedians over {args.rounds} round(s) of {N} steps ({n_refills} refill(s) each); "
          f"wall | process CPU time (all threads: other jobs' load barely changes it)")
    med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in rows.items()}
    for name, label in (("fixed", "SAE steps on a fixed batch"),
                        ("fed", "SAE steps fed on the fly")):
        w, c = med[name]
        print(f"  {label:<34} {w:7.2f} s | {c:7.2f} s   ({w / N * 1e3:.0f} ms/step wall)")
    for k in kinds:
        w, c = med[f"refill {k}"]
        print(f"  refills alone, {k:<7} shuffle       {w:7.2f} s | {c:7.2f} s   "
              f"({w / n_refills * 1e3:.0f} ms/refill: "
              f"{g.lm_tokens_per_harvest * n_refills / w:,.0f} LM tokens/s, "
              f"{g.half * n_refills / w:,.0f} rows/s wall)")

    w, c = med["serve"]
    print(f"  {N} batch slices alone                  {w:7.2f} s | {c:7.2f} s")

    def ratios(i):
        fx = [t[i] for t in rows["fixed"]]
        fd = [t[i] for t in rows["fed"]]
        rf = [t[i] for t in rows[f"refill {kinds[0]}"]]
        wait = statistics.median((b - a) / b for a, b in zip(fx, fd))
        share = statistics.median(c / (a + c) for a, c in zip(fx, rf))
        host = statistics.median((b - a - c) / b for a, b, c in zip(fx, fd, rf))
        return wait, share, host

    (ww, ws, wh), (cw, cs, ch) = ratios(0), ratios(1)
    print("  (medians of per-round ratios)                         wall  |  CPU")
    print(f"  data-wait fraction  (fed - fixed) / fed              {ww:6.3f} | {cw:6.3f}")
    print(f"  refill share if taking turns  refill/(fixed+refill)  {ws:6.3f} | {cs:6.3f}")
    print(f"  host overhead  (fed - fixed - refill) / fed          {wh:+6.3f} | {ch:+6.3f}")
    fx, rf = med["fixed"][0], med[f"refill {kinds[0]}"][0]
    consume, harvest_rate = args.batch * N / fx, g.half * n_refills / rf
    print(f"  SAE consumes {consume:,.0f} rows/s; refills harvest {harvest_rate:,.0f} rows/s "
          f"(x{harvest_rate / consume:.1f})")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
