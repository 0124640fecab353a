"""Ground-truth recovery vs dictionary size on synthetic superposition data.

Sharkey et al. (2022) train SAEs on sparse combinations of known feature directions and ask how
many of the true features the learned dictionary recovers (MMCS, the mean over true features of
the best cosine with any decoder row) as the dictionary grows past the true feature count. This
script does that with saejax's real training loop for both families, and prints a markdown table.

    python experiments/synthetic_recovery/run.py                 # the table in README.md
    python experiments/synthetic_recovery/run.py --ratios 1 2 --steps 1000   # quicker
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saejax.config import load_config
from saejax.train.loop import train

ARCHS = {  # the family's own sparsity knob, set so that L0 is near the true L0 (5.1) or clearly above
    # λ on normalised inputs: 2.5e-2 is the 4e-3 this study first used on the raw inputs (their
    # norm scale is about 6.1); held fixed (target_l0=0) as the study compares fixed knobs.
    "relu": ["sae.arch=relu", "sae.relu.l1_coefficient=2.5e-2", "sae.relu.target_l0=0"],
    "topk": ["sae.arch=topk", "sae.topk.k=8", "sae.topk.k_aux=32", "sae.topk.dead_tokens_aux=200000"],
}


def run_one(arch: str, ratio: float, args, out: Path) -> dict:
    n_features = int(ratio * args.n_true)
    run_dir = out / f"{arch}_x{ratio:g}"
    cfg = load_config(None, ARCHS[arch] + [
        f"sae.d_in={args.d_in}", f"sae.n_features={n_features}",
        f"data.n_true_features={args.n_true}", f"data.p_active={args.p_active}",
        f"train.steps={args.steps}", f"train.run_dir={run_dir}", "train.progress=false",
        f"train.checkpoint_every={args.steps}", "train.keep_checkpoints=1",
        "resample.at_fractions=[0.5]", f"resample.window_steps={args.steps // 10}",
        "resample.n_inputs=65536",
    ])
    t0 = time.perf_counter()
    summary = train(cfg, quiet=True)
    return {"arch": arch, "ratio": ratio, "n_features": n_features,
            "seconds": round(time.perf_counter() - t0, 1), **summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1, 2, 4],
                   help="dictionary size / true feature count")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--n-true", type=int, default=512)
    p.add_argument("--p-active", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", default="runs/synthetic_recovery")
    args = p.parse_args()
    out = Path(args.out)
    rows = [run_one(a, r, args, out) for a in args.archs for r in args.ratios]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"d_in={args.d_in}, true features={args.n_true}, p_active={args.p_active} "
          f"(true L0 {args.n_true * args.p_active:.2f}), {args.steps} steps of 1024\n")
    print("| arch | F / n_true | F | MMCS | L0 | FVU | dead | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['arch']} | {r['ratio']:g} | {r['n_features']} | {r['mmcs']:.3f} | "
              f"{r['l0']:.2f} | {r['fvu']:.3f} | {r['dead_fraction']:.3f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
