#!/usr/bin/env bash
# The whole GPU measurement of issue 11 in one call, every figure a ratio taken in this one run:
# saejax's real train step (ReLU and TopK k=32; float32 and bfloat16; TopK dense and sparse) at
# B=4096, d_in=2048, F=131072 against the matmul rate in the same dtype at the step's shapes and
# against a plain PyTorch step on the same card, then the issue's ratios and goals.
#
#   bash bench/gpu.sh                 # on a GPU machine (jax[cuda], flax, optax, orbax, torch)
#   bash bench/gpu.sh --tiny          # dry run on CPU at tiny shapes (checks the script works)
#
# Needs no install: the checkout is put on PYTHONPATH. Environment: PYTHON (default python3),
# BENCH_OUT (where the JSON figures go; default $OUT if set, else a temporary directory),
# STEPS/WARMUP (timed/untimed rounds). The JAX and PyTorch parts run one after the other in
# separate processes (JAX holds most of the GPU's memory while it runs). ~3-5 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUTDIR=${BENCH_OUT:-${OUT:-$(mktemp -d)}}
mkdir -p "$OUTDIR"

if [[ "${1:-}" == "--tiny" ]]; then
  SHAPE=(--batch 256 --d-in 64 --n-features 2048 --k 8)
  export JAX_PLATFORMS=cpu
  TORCH_DEVICE=(--device cpu)
  STEPS=${STEPS:-2}; WARMUP=${WARMUP:-1}
else
  SHAPE=(--batch 4096 --d-in 2048 --n-features 131072 --k 32)
  TORCH_DEVICE=()
  STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
ROUNDS=(--steps "$STEPS" --warmup "$WARMUP")
echo "== saejax step (figures: $OUTDIR/jax.json)"
timeout 330 "$PY" bench/step_throughput.py "${SHAPE[@]}" "${ROUNDS[@]}" --arch relu,topk \
  --dtype float32,bfloat16 --decode dense,sparse --no-chain --json "$OUTDIR/jax.json"
echo
echo "== plain PyTorch step (figures: $OUTDIR/torch.json)"
timeout 150 "$PY" bench/torch_reference.py "${SHAPE[@]}" "${ROUNDS[@]}" "${TORCH_DEVICE[@]}" \
  --json "$OUTDIR/torch.json"
echo
"$PY" - "$OUTDIR/jax.json" "$OUTDIR/torch.json" <<'EOF'
"""The issue's ratios from the two JSON files of this run."""
import json
import sys

jx, th = (json.load(open(p)) for p in sys.argv[1:3])
steps, ref = jx["steps"], th["steps"]
GIB = 2**30


def t(name):
    return steps[name]["seconds"] if name in steps else None


def line(what, value, goal=None, ok=None):
    mark = "" if ok is None else ("  [met]" if ok else "  [NOT met]")
    print(f"  {what:<62}{value}{'' if goal is None else '   goal ' + goal}{mark}")


print(f"ratios ({jx['device_kind']}, jax {jx['jax']}; torch {th['torch']}), "
      f"B={jx['shape']['batch']} d={jx['shape']['d_in']} F={jx['shape']['n_features']} "
      f"k={jx['shape']['k']}:")
for name, why in jx.get("failed", {}).items():
    print(f"  {name}: did not compile ({why})")
for dt, tag in (("float32", "f32"), ("bfloat16", "bf16")):
    relu = f"relu {tag}"
    if relu in steps:
        s = steps[relu]
        goal = ">= 0.75" if tag == "bf16" else None
        line(f"ReLU {tag} step / {tag} matmul rate at the step's shapes", f"{s['vs_matmul']:.3f}",
             goal, s["vs_matmul"] >= 0.75 if goal else None)
        if f"relu-{tag}" in ref:
            r = ref[f"relu-{tag}"]["seconds"] / s["seconds"]
            line(f"ReLU {tag}: PyTorch time / saejax time", f"{r:.2f}x",
                 "> 1" if tag == "bf16" else None, r > 1 if tag == "bf16" else None)
    for dec in ("dense", "sparse"):
        name = f"topk {tag} {dec}"
        if name not in steps:
            continue
        s = steps[name]
        line(f"TopK {tag} {dec} step (s) / {tag} matmul rate",
             f"{s['seconds']:.4f} s, {s['vs_matmul']:.3f}")
        temp = (s["memory"] or {}).get("temp")
        if temp is not None:
            line(f"TopK {tag} {dec} temporaries", f"{temp / GIB:.2f} GiB",
                 "<= 8 GiB" if tag == "bf16" else None, temp <= 8 * GIB if tag == "bf16" else None)
        for kind in ("sparse", "dense"):
            if f"topk-{kind}-{tag}" in ref:
                r = ref[f"topk-{kind}-{tag}"]["seconds"] / s["seconds"]
                must = tag == "bf16" and kind == "sparse"
                line(f"TopK {tag} {dec}: PyTorch {kind}-decode time / saejax time", f"{r:.2f}x",
                     "> 1" if must else None, r > 1 if must else None)
        if t(f"relu {tag}"):
            r = s["seconds"] / t(f"relu {tag}")
            line(f"TopK {tag} {dec} step / ReLU {tag} step", f"{r:.2f}",
                 "<= 0.5" if tag == "bf16" else None, r <= 0.5 if tag == "bf16" else None)
for f32, bf16 in (("relu f32", "relu bf16"), ("topk f32 dense", "topk bf16 dense"),
                  ("topk f32 sparse", "topk bf16 sparse")):
    if t(f32) and t(bf16):
        line(f"{bf16.replace(' bf16', '')}: float32 time / bfloat16 time",
             f"{t(f32) / t(bf16):.2f}x")
for tag in ("f32", "bf16"):
    d, s = t(f"topk {tag} dense"), t(f"topk {tag} sparse")
    if d and s:
        md = (steps[f"topk {tag} dense"]["memory"] or {}).get("temp")
        ms = (steps[f"topk {tag} sparse"]["memory"] or {}).get("temp")
        mem = f", temporaries sparse/dense {ms / md:.3f}" if md and ms else ""
        line(f"TopK {tag}: dense time / sparse time", f"{d / s:.2f}x{mem}")
EOF
