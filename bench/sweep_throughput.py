"""What a sweep saves: N SAEs in one compiled step, and N SAEs in one run, measured in one process.

    python bench/sweep_throughput.py [--members 1,2,4,8 --arch relu,topk --shape small,bench
                                      --steps 3 --warmup 1 --e2e-members 8 --e2e-steps 24
                                      --lm DIR --tokens DIR --json out.json]
    python bench/sweep_throughput.py --tiny        # everything at tiny shapes (a dry run)

Part 1, step level. For each shape (B,d,F) and family: the real compiled step of one sweep group
of N members (`StepContract.build(cfg, mesh, members)`: lr and seed varying, carried as data, so
one group) against the single-SAE step (`StepContract.build(cfg, mesh)`), both compiled ahead of
time with donated state, on the same fixed batch. Each round times N single steps back to back
and then one group step, each to `block_until_ready`; the per-member ratio of a round is
N·B/t_group ÷ B/t_single_step = t(N single steps) / t(group step), >1 when a member costs less
inside the group than alone. Medians over rounds after warm-up, from wall time and from process
CPU time (on a CPU host shared with other jobs, wall times vary 2-3x; CPU time barely moves).
Shapes: `small` = B1024 d512 F4096, `bench` = B4096 d512 F16384 (bench/step_throughput.py's
default), or B,d,F.

Part 2, end to end with the on-the-fly LM feed (`data.source=lm`): one `saejax train` run of a
sweep of N members (lr and seed varying) against N separate runs of the same members, one after
the other, each a child process `python -m saejax.cli train` (JAX_PLATFORMS=cpu unless
`--e2e-platform` says otherwise). Wall time and the children's CPU time (getrusage), and their
ratio (N runs / one sweep); also the ratio of seconds per training step in the second half of
the runs (from metrics.jsonl's tokens/s: no start-up, compiling or summary), which long runs
approach. Defaults: SAEs at B1024 F4096, 24 steps, `data.buffer_size=65536` (a refill within the
run) and `resample.n_inputs=16384` (resampling's forward passes sized to the run). LM and
tokens: `--lm`/`--tokens` (default: the one-layer model of experiments/monosemanticity_1l at
/work/mono1l when it exists), else a tiny random GPT-2 and token dataset built on the spot in a
temporary directory.

Goals (issue 13): per-member throughput of N=8 in one step >= 0.95 of a single SAE's; 8 members
in one run >= 3x faster end to end than 8 runs. On CPU both are judged from CPU time, elsewhere
from wall time. Real devices only, like bench/step_throughput.py (fake CPU devices share cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Part 2's runs are child processes on the same devices: on a GPU this process must not take
# most of its memory up front (JAX's default), only what part 1 uses.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from saejax.config import Config, ConfigError
from saejax.sae import FAMILIES
from saejax.sharding import make_mesh
from saejax.sweep import Group, build as build_sweep
from saejax.train.step import StepContract
from saejax.typedconfig import load_tree

SHAPES = {"small": (1024, 512, 4096), "bench": (4096, 512, 16384), "tiny": (64, 32, 128)}
"""(B, d_in, F) by name; `bench` is bench/step_throughput.py's default shape."""
STEP_GOAL, E2E_GOAL, GOAL_N = 0.95, 3.0, 8
SITE = "blocks.0.mlp.hook_post"
DEFAULT_LM, DEFAULT_TOKENS = Path("/work/mono1l/lm/hf"), Path("/work/mono1l/tokens")


def seconds(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn() up to block_until_ready of its result."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def member_cells(n: int) -> list[dict[str, str]]:
    """n sweep members differing in lr and seed (both carried as data: one group)."""
    lr = Config().optim.lr
    return [{"optim.lr": f"{lr * (1 + i / 8):.6g}", "train.seed": str(i)} for i in range(n)]


# ---------------------------------------------------------------- part 1: one step


def step_group(shape: tuple[int, int, int], arch: str, n: int, k: int, mesh: str) -> Group:
    b, d, f = shape
    sae, data, model = mesh.split(",")
    base = load_tree(overrides=[f"sae.arch={arch}", f"sae.d_in={d}", f"sae.n_features={f}",
                                f"sae.topk.k={k}", f"train.batch_size={b}", f"mesh.sae={sae}",
                                f"mesh.data={data}", f"mesh.model={model}"])
    sweep = build_sweep(base, member_cells(n), jax.device_count())
    assert len(sweep.groups) == 1, "lr and seed are data: the members must form one group"
    return sweep.groups[0]


class Stepper:
    """One compiled step (a single SAE's, or a group's with `members`) with its donated, so
    carried, state and a fixed batch."""

    def __init__(self, cfg: Config, mesh, x: np.ndarray, members: tuple[Config, ...] = ()):
        c = StepContract.build(cfg, mesh, members)
        self.batch = jax.device_put(x, c.batch_sharding)
        self.state = c.init(self.batch)
        self.compiled = c.step_fn.lower(self.state, self.batch).compile()

    def __call__(self, times: int = 1) -> Any:
        for _ in range(times):
            self.state, metrics = self.compiled(self.state, self.batch)
        return self.state, metrics

    def temp_mib(self) -> float | None:
        try:
            return self.compiled.memory_analysis().temp_size_in_bytes / 2**20
        except Exception:  # not every backend implements it
            return None


def rounds(single: Stepper, grouped: Stepper, n: int, args) -> list[tuple]:
    """Per timed round: ((wall, CPU) of n single steps, (wall, CPU) of one group step)."""
    out = []
    for i in range(args.warmup + args.steps):
        pair = seconds(lambda: single(n)), seconds(grouped)
        if i >= args.warmup:
            out.append(pair)
    return out


def measure(single: Stepper, mesh, x: np.ndarray, group: Group, args) -> dict:
    """One row of part 1: the group's step against its size in single steps."""
    n, b = len(group.members), x.shape[0]
    t0 = time.perf_counter()
    grouped = Stepper(group.cfg, mesh, x, tuple(m.cfg for m in group.members))
    compile_s = time.perf_counter() - t0
    timed = rounds(single, grouped, n, args)
    median = lambda fn: statistics.median(fn(s, g) for s, g in timed)  # noqa: E731
    row = {"N": n, "single_s": median(lambda s, g: s[0]) / n,
           "group_s": median(lambda s, g: g[0]),
           "ratio_wall": median(lambda s, g: s[0] / g[0]),
           "ratio_cpu": median(lambda s, g: s[1] / g[1]),
           "group_temp_mib": grouped.temp_mib(), "init_compile_s": compile_s}
    row["tokens_s_single"] = b / row["single_s"]
    row["member_tokens_s_group"] = n * b / row["group_s"]
    return row


def step_level(args, shapes: dict[str, tuple[int, int, int]]) -> list[dict]:
    rows = []
    for shape_name, shape in shapes.items():
        b, d, f = shape
        x = np.maximum(np.random.default_rng(0).normal(size=(b, d)), 0).astype(np.float32)
        for arch in args.arch:
            solo = step_group(shape, arch, 1, args.k, args.mesh).cfg
            mesh = make_mesh(solo.mesh)
            single = Stepper(solo, mesh, x)
            for n in args.members:
                row = {"shape": shape_name, "B": b, "d": d, "F": f, "arch": arch,
                       **measure(single, mesh, x, step_group(shape, arch, n, args.k, args.mesh),
                                 args)}
                rows.append(row)
                print(f"  {shape_name} {arch} N={n}: ratio {row['ratio_wall']:.3f} wall, "
                      f"{row['ratio_cpu']:.3f} CPU ({row['init_compile_s']:.1f} s init + "
                      "compile)", flush=True)
    return rows


def print_step_table(rows: list[dict]) -> None:
    print("\nPart 1: N members in one compiled step vs N single-SAE steps "
          "(per-member ratio = t(N single steps) / t(group step))")
    head = (f"{'shape':<16}{'arch':<7}{'N':>3}{'single s':>10}{'group s':>10}{'tok/s single':>14}"
            f"{'tok·mem/s grp':>15}{'ratio wall':>12}{'ratio CPU':>11}{'grp temp MiB':>14}")
    print(head)
    for r in rows:
        temp = f"{r['group_temp_mib']:>14.1f}" if r["group_temp_mib"] is not None else f"{'-':>14}"
        print(f"{r['shape'] + ' ' + str(r['F']):<16}{r['arch']:<7}{r['N']:>3}"
              f"{r['single_s']:>10.4f}{r['group_s']:>10.4f}{r['tokens_s_single']:>14,.0f}"
              f"{r['member_tokens_s_group']:>15,.0f}{r['ratio_wall']:>12.3f}"
              f"{r['ratio_cpu']:>11.3f}{temp}")


# ---------------------------------------------------------------- part 2: end to end


def tiny_lm_world(root: Path) -> tuple[Path, Path]:
    """A random one-layer GPT-2 (d_model 32, d_mlp 64) and a token dataset of 32-token
    contexts, as tests/tiny_world.py builds them."""
    from transformers import GPT2Config

    from saejax.lm.gpt2 import config_from_hf
    from saejax.lm.model import init_lm
    from saejax.lm.save import save_hf
    from saejax.text.tokenizer import train_bpe
    from saejax.text.tokens import write_token_dataset

    words = "the cat sat on a mat while dogs ran in parks and code reads every file".split()
    docs = [" ".join(words[(i * j) % len(words)] for j in range(3 + i % 11)) for i in range(600)]
    tokenizer = train_bpe(docs, 300, root / "tokenizer")
    tokens = root / "tokens"
    write_token_dataset(docs, tokenizer, tokens, ctx_len=32)
    hf = GPT2Config(n_layer=1, n_embd=32, n_head=4, n_inner=64, n_positions=32,
                    vocab_size=len(tokenizer), activation_function="relu",
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    lm_cfg = config_from_hf(hf)
    lm = save_hf(init_lm(lm_cfg, seed=0), lm_cfg, root / "lm", root / "tokenizer",
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return Path(lm), tokens


def site_width(lm: Path, site: str) -> int:
    """d_in of `site` (an MLP site: the MLP width; else the residual width)."""
    from saejax.lm.load import FAMILIES as LM_FAMILIES, read_hf_config, resolve_model_dir

    hf = read_hf_config(resolve_model_dir(lm))
    cfg = LM_FAMILIES[hf.model_type].config_from_hf(hf)
    return cfg.d_mlp if ".mlp.hook_post" in site or ".mlp.hook_pre" in site else cfg.d_model


def child(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall, CPU of the child and its children) seconds of `python -m saejax.cli *argv`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "saejax.cli", *argv], env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"child failed (exit {rc}): saejax {' '.join(argv)}\n"
                         + log.read_text()[-3000:])
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def step_seconds(run_dir: Path, batch_size: int) -> float:
    """Seconds per step of a finished run's training loop in its second half (steps, feed
    refills, resampling; not start-up, compiling, init or the held-out summary), from the
    tokens/s of its last log record."""
    rates = [r["tokens_per_s"] for r in map(json.loads,
                                            (run_dir / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_s" in r]
    if not rates:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no tokens_per_s record")
    return batch_size / rates[-1]


def e2e_overrides(args, lm: Path, tokens: Path, d_in: int) -> list[str]:
    b, _, f = args.e2e_shape
    return ["data.source=lm", f"data.lm_path={lm}", f"data.tokens_path={tokens}",
            f"data.site={args.site}", f"sae.d_in={d_in}", f"sae.n_features={f}",
            f"train.batch_size={b}", f"train.steps={args.e2e_steps}",
            f"train.log_every={max(args.e2e_steps // 2, 1)}", "train.progress=false", *args.e2e_set]


def end_to_end(args, work: Path) -> list[dict]:
    lm, tokens = args.lm, args.tokens
    if lm is None or tokens is None:
        print("  building a tiny LM and token dataset (no --lm/--tokens) ...", flush=True)
        lm, tokens = tiny_lm_world(work / "world")
    d_in = site_width(lm, args.site)
    common = e2e_overrides(args, lm, tokens, d_in)
    env = {**os.environ}
    if args.e2e_platform:
        env["JAX_PLATFORMS"] = args.e2e_platform
    cells = member_cells(max(args.e2e_members))
    print(f"  LM {lm} ({args.site}, d_in {d_in}), tokens {tokens}\n  saejax train "
          + " ".join(common), flush=True)
    solo = []  # (wall, CPU, per-step) seconds of each separate run
    batch = args.e2e_shape[0]
    for i, cell in enumerate(cells):
        run_dir = work / f"solo{i}"
        run = ["train", "--quiet", *common, *(f"{k}={v}" for k, v in cell.items()),
               f"train.run_dir={run_dir}"]
        solo.append((*child(run, env, work / f"solo{i}.log"), step_seconds(run_dir, batch)))
        print(f"  run {i + 1}/{len(cells)}: {solo[-1][0]:.1f} s wall, {solo[-1][1]:.1f} s CPU, "
              f"{solo[-1][2]:.3f} s/step", flush=True)
    rows = []
    for n in args.e2e_members:
        spec, run_dir = work / f"sweep{n}.yaml", work / f"sweep{n}"
        spec.write_text(yaml.safe_dump({"sweep": {"members": cells[:n]}}))
        run = ["train", "--quiet", "--config", str(spec), *common, f"train.run_dir={run_dir}"]
        wall, cpu = child(run, env, work / f"sweep{n}.log")
        step = step_seconds(run_dir, batch)
        runs_wall, runs_cpu, runs_step = (sum(s[j] for s in solo[:n]) for j in range(3))
        rows.append({"N": n, "sweep_wall_s": wall, "sweep_cpu_s": cpu, "sweep_step_s": step,
                     "runs_wall_s": runs_wall, "runs_cpu_s": runs_cpu, "runs_step_s": runs_step,
                     "ratio_wall": runs_wall / wall, "ratio_cpu": runs_cpu / cpu,
                     "ratio_step": runs_step / step, "steps": args.e2e_steps,
                     "shape": list(args.e2e_shape), "d_in": d_in})
        print(f"  sweep of {n}: {wall:.1f} s wall, {cpu:.1f} s CPU, {step:.3f} s/step",
              flush=True)
    return rows


def print_e2e_table(rows: list[dict]) -> None:
    print("\nPart 2: one `saejax train` sweep of N members vs N separate runs, on-the-fly LM "
          "feed (ratio = N runs / one sweep)")
    print(f"{'N':>3}{'sweep wall s':>14}{'N runs wall s':>15}{'ratio wall':>12}"
          f"{'sweep CPU s':>13}{'N runs CPU s':>14}{'ratio CPU':>11}"
          f"{'sweep s/step':>14}{'N runs s/step':>15}{'ratio step':>12}")
    for r in rows:
        print(f"{r['N']:>3}{r['sweep_wall_s']:>14.1f}{r['runs_wall_s']:>15.1f}"
              f"{r['ratio_wall']:>12.2f}{r['sweep_cpu_s']:>13.1f}{r['runs_cpu_s']:>14.1f}"
              f"{r['ratio_cpu']:>11.2f}{r['sweep_step_s']:>14.4f}{r['runs_step_s']:>15.4f}"
              f"{r['ratio_step']:>12.2f}")
    print("s/step: the training loop's second half (wall; steps, feed refills, resampling) "
          "from metrics.jsonl's tokens/s, without start-up, compiling and the summary: "
          "the ratio that long runs approach")


# ---------------------------------------------------------------- goals


def judged(on_cpu: bool) -> tuple[str, str]:
    """(ratio key, its name): CPU time on a CPU host (other jobs' load barely moves it), wall
    time on accelerators (the host's CPU time says nothing about them)."""
    return ("ratio_cpu", "CPU time") if on_cpu else ("ratio_wall", "wall time")


def goals(step_rows: list[dict], e2e_rows: list[dict], step_cpu: bool,
          e2e_cpu: bool) -> list[str]:
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [f"goals at N={GOAL_N}:"]
    (key, what), at_goal = judged(step_cpu), [r for r in step_rows if r["N"] == GOAL_N]
    for r in at_goal:
        lines.append(f"  step, {r['shape']} {r['arch']}: per-member throughput "
                     f"{r[key]:.3f} of a single SAE's from {what} (goal >= {STEP_GOAL}): "
                     f"{verdict(r[key] >= STEP_GOAL)}")
    if step_rows and not at_goal:
        lines.append(f"  step: not measured at N={GOAL_N}")
    (key, what), at_goal = judged(e2e_cpu), [r for r in e2e_rows if r["N"] == GOAL_N]
    for r in at_goal:
        lines.append(f"  end to end: one sweep {r[key]:.2f}x faster than {GOAL_N} runs from "
                     f"{what} (goal >= {E2E_GOAL}x): {verdict(r[key] >= E2E_GOAL)}")
    if e2e_rows and not at_goal:
        lines.append(f"  end to end: not measured at N={GOAL_N}")
    return lines


# ---------------------------------------------------------------- command line


def shape_arg(text: str) -> tuple[str, tuple[int, int, int]]:
    if text in SHAPES:
        return text, SHAPES[text]
    try:
        b, d, f = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'/'.join(SHAPES)} or B,d,F, got {text!r}")
    return text, (b, d, f)


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="everything at tiny shapes with a tiny LM (a dry run, under a minute)")
    p.add_argument("--parts", default="step,e2e", help="which parts: step, e2e or both")
    p.add_argument("--members", type=int_list,
                   help="part 1: members per group (comma-separated; default 1,2,4,8, "
                        "with --tiny 1,8)")
    p.add_argument("--arch", default="relu,topk", help="part 1: SAE families (comma-separated)")
    p.add_argument("--shape", action="append", type=shape_arg,
                   help="part 1: small, bench, tiny or B,d,F (repeatable; default small, bench)")
    p.add_argument("--k", type=int, default=32, help="TopK: active latents per token")
    p.add_argument("--mesh", default="1,-1,1", help="part 1: sae,data,model mesh sizes")
    p.add_argument("--steps", type=int, default=3, help="part 1: timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="part 1: untimed rounds")
    p.add_argument("--e2e-members", type=int_list, default=[GOAL_N],
                   help="part 2: members per sweep (comma-separated; the N runs are shared)")
    p.add_argument("--e2e-shape", type=lambda t: shape_arg(t)[1], default=SHAPES["small"],
                   help="part 2: B,d,F of the SAEs (d is the site's width, whatever is given)")
    p.add_argument("--e2e-steps", type=int, default=24, help="part 2: steps of every run")
    p.add_argument("--e2e-set", action="append", default=None, metavar="field=value",
                   help="part 2: further overrides of every run (repeatable; given, they "
                        "replace the default data.buffer_size=65536 resample.n_inputs=16384)")
    p.add_argument("--e2e-platform", default="cpu",
                   help="part 2: JAX_PLATFORMS of the runs ('' = leave it as it is)")
    p.add_argument("--lm", type=Path, help=f"part 2: HF LM directory (default {DEFAULT_LM})")
    p.add_argument("--tokens", type=Path,
                   help=f"part 2: token dataset (default {DEFAULT_TOKENS})")
    p.add_argument("--site", default=SITE, help="part 2: hook site")
    p.add_argument("--work", type=Path, help="part 2: directory for the runs (default: temp)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    args.arch = args.arch.split(",")
    if unknown := sorted(set(args.arch) - set(FAMILIES)):
        p.error(f"--arch: unknown {unknown} (known: {sorted(FAMILIES)})")
    args.parts = set(args.parts.split(","))
    if args.tiny:
        args.shape = args.shape or [("tiny", SHAPES["tiny"])]
        args.members = args.members or [1, GOAL_N]
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.e2e_members = [2]
        args.e2e_shape, args.e2e_steps = (64, 0, 128), min(args.e2e_steps, 8)
        args.e2e_set = args.e2e_set or ["data.buffer_size=1024", "data.buffer_blocks=4",
                                        "data.lm_batch_contexts=16", "resample.n_inputs=1024"]
        args.lm = args.tokens = None  # always the tiny LM: a dry run must be quick
    else:
        args.shape = args.shape or [(n, SHAPES[n]) for n in ("small", "bench")]
        args.members = args.members or [1, 2, 4, GOAL_N]
        args.e2e_set = args.e2e_set or ["data.buffer_size=65536", "resample.n_inputs=16384"]
        if args.lm is None and args.tokens is None and DEFAULT_LM.is_dir() \
                and DEFAULT_TOKENS.is_dir():
            args.lm, args.tokens = DEFAULT_LM, DEFAULT_TOKENS
    if (args.lm is None) != (args.tokens is None):
        p.error("give both --lm and --tokens, or neither")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    platform = jax.devices()[0].platform
    print(f"{jax.device_count()} {platform} device(s) ({jax.devices()[0].device_kind}) | "
          f"jax {jax.__version__} | part 1: {args.steps} timed rounds after {args.warmup} "
          f"warm-up, mesh sae,data,model={args.mesh}", flush=True)
    results: dict[str, Any] = {"platform": platform, "devices": jax.device_count(),
                               "jax": jax.__version__, "step": [], "e2e": []}
    if "step" in args.parts:
        t0 = time.perf_counter()
        try:
            results["step"] = step_level(args, dict(args.shape))
        except ConfigError as e:
            raise SystemExit(f"sweep_throughput: {e}")
        print_step_table(results["step"])
        print(f"(part 1 took {time.perf_counter() - t0:.0f} s)")
    if "e2e" in args.parts:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="sweep_bench_") as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            results["e2e"] = end_to_end(args, work)
        print_e2e_table(results["e2e"])
        print(f"(part 2 took {time.perf_counter() - t0:.0f} s)")
    # Part 2's children run under --e2e-platform: judged as such.
    e2e_cpu = args.e2e_platform == "cpu" or (args.e2e_platform == "" and platform == "cpu")
    results["goals"] = goals(results["step"], results["e2e"], platform == "cpu", e2e_cpu)
    if args.tiny:
        results["goals"][0] = (results["goals"][0].rstrip(":")
                               + " (--tiny: a dry run; the goals are for the default shapes):")
    print("\n" + "\n".join(results["goals"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
