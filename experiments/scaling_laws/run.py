"""Scaling laws and feature splitting from ONE sweep: TopK SAEs of 512 to 8,192 latents × k × seeds
on the one-layer model's MLP activations, trained together in one `saejax train --sweep` run
(one activation stream, one compiled step per dictionary size), then

    saejax report  W/sweep --tokens T --out W/report     (table, frontier, size, densities;
                                                          every member spliced into the LM)
    saejax scaling W/sweep W/short4 W/short2 --out W/scaling   (power laws: loss vs latents at
                                                          fixed k; vs tokens with the short sweeps)
    saejax compare W/sweep:<512> W/sweep:<2048> W/sweep:<8192> --tokens T --out W/splitting

(W = --work; figures are copied next to this file). Two shorter sweeps (a quarter and half of
the steps; the largest k, seed 0) give the token axis. Every stage resumes: rerun the command.

    python experiments/monosemanticity_1l/run.py --until sae   # first: LM, tokens, activations
    python experiments/scaling_laws/run.py --mono data/mono1l
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

HERE = Path(__file__).parent
SITE = "blocks.0.mlp.hook_post"


def cli(*argv: str) -> None:
    from saejax import cli as saejax_cli

    print("saejax", " ".join(argv), flush=True)
    rc = saejax_cli.main(list(argv))
    if rc:
        raise SystemExit(f"saejax {argv[0]} exited {rc}")


def train_args(args, run_dir: Path, steps: int, sweeps: list[str]) -> list[str]:
    base = ["train", "--quiet", "data.source=store", f"data.store_path={args.acts}",
            f"data.site={SITE}", "sae.d_in=512", "sae.arch=topk", f"train.steps={steps}",
            f"train.batch_size={args.batch}", f"optim.lr={args.lr}", f"train.run_dir={run_dir}",
            "train.log_every=100", f"train.checkpoint_every={steps}", "train.progress=false"]
    return base + [a for s in sweeps for a in ("--sweep", s)]


def timed(seconds: dict, key: str, path: Path, fn) -> None:
    """Run fn once (a stage), recording its wall time in seconds.json."""
    if key in seconds:
        return
    t0 = time.perf_counter()
    fn()
    seconds[key] = round(time.perf_counter() - t0, 1)
    path.write_text(json.dumps(seconds, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mono", default="data/mono1l", help="the one-layer experiment's --work")
    p.add_argument("--acts", help="activation store (default: MONO/acts)")
    p.add_argument("--tokens", help="token dataset (default: MONO/tokens)")
    p.add_argument("--work", default="data/scaling_laws")
    p.add_argument("--sizes", default="512,1024,2048,4096,8192")
    p.add_argument("--ks", default="16,32")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--contexts", default="12000:14000", help="held-out contexts for eval")
    p.add_argument("--tree", default="512,2048,8192", help="sizes of the family tree")
    p.add_argument("--token-sweeps", default="4,2",
                   help="shorter sweeps at steps/D for each D ('' = none: no token axis)")
    args = p.parse_args()
    mono = Path(args.mono)
    args.acts = args.acts or str(mono / "acts")
    args.tokens = args.tokens or str(mono / "tokens")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timing = work / "seconds.json"
    seconds = json.loads(timing.read_text()) if timing.exists() else {}

    sizes = f"sae.n_features=[{args.sizes}]"
    main_sweep = [sizes, f"sae.topk.k=[{args.ks}]", f"train.seed=[{args.seeds}]"]
    timed(seconds, "sweep", timing,
          lambda: cli(*train_args(args, work / "sweep", args.steps, main_sweep)))
    # The token axis: the largest k, one seed, at a quarter and half of the steps.
    short_sweep = [sizes, f"sae.topk.k=[{args.ks.split(',')[-1]}]"]
    shorter = {f"short{d}": args.steps // int(d) for d in args.token_sweeps.split(",") if d}
    for name, steps in shorter.items():
        timed(seconds, name, timing,
              lambda: cli(*train_args(args, work / name, steps, short_sweep)))
    evald = ["--tokens", args.tokens, f"--contexts={args.contexts}"]
    timed(seconds, "report", timing,
          lambda: cli("report", str(work / "sweep"), "--out", str(work / "report"), *evald))
    timed(seconds, "scaling", timing,
          lambda: cli("scaling", str(work / "sweep"), *(str(work / n) for n in shorter),
                      "--out", str(work / "scaling"), *evald))
    k, seed = args.ks.split(",")[-1], args.seeds.split(",")[0]
    tree = [f"{work / 'sweep'}:n_features={n},k={k},seed={seed}" for n in args.tree.split(",")]
    timed(seconds, "compare", timing,
          lambda: cli("compare", *tree, "--tokens", args.tokens, "--contexts=12000:13000",
                      "--out", str(work / "splitting")))
    figures = HERE / "figures"
    figures.mkdir(exist_ok=True)
    for src in [*(work / "report").glob("*.png"), *(work / "scaling").glob("*.png"),
                *(work / "splitting").glob("*.png")]:
        shutil.copy(src, figures / src.name)
    for name in ("report/report.md", "scaling/scaling.md"):
        shutil.copy(work / name, HERE / Path(name).name)
    print(json.dumps(seconds, indent=1))


if __name__ == "__main__":
    main()
