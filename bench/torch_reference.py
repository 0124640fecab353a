"""A plain PyTorch SAE train step at the shapes of bench/step_throughput.py, timed the same way.

    python bench/torch_reference.py [--batch 4096 --d-in 512 --n-features 16384 --k 32
                                     --variants relu-f32,relu-bf16,topk-dense-f32,...
                                     --steps 3 --warmup 1 --json out.json]

The reference a user would write by hand (eager PyTorch, no torch.compile), doing what a saejax
step does: x̄ = x − b_dec; pre = x̄ W_enc + b_enc (`F.linear`); codes; x̂ = codes W_dec + b_dec;
loss = MSE (+ λ·L1 for ReLU); backward; the decoder-parallel gradient removed; Adam (fused on
CUDA); decoder rows renormalised. Variants:

  relu-f32 / relu-bf16            ReLU; bf16 = `torch.autocast(bfloat16)` (products in bf16,
                                  MSE and L1 sums in float32)
  topk-dense-{f32,bf16}           TopK (k): codes scattered into a dense [B,F], dense decode
  topk-sparse-{f32,bf16}          TopK: decode by `F.embedding_bag(indices, W_dec,
                                  per_sample_weights=values, mode="sum")` (float32: the decode
                                  is a gather-sum, not a matmul); bf16 applies to the encoder

float32 products use TF32 on NVIDIA GPUs (`torch.backends.cuda.matmul.allow_tf32`), as JAX's
default precision does. All variants share one set of parameters and one optimizer (only time
is measured). Each round runs one step of each variant, to `torch.cuda.synchronize`; medians
over rounds after warm-up, as bench/step_throughput.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

VARIANTS = ["relu-f32", "relu-bf16", "topk-dense-f32", "topk-dense-bf16", "topk-sparse-f32",
            "topk-sparse-bf16"]
L1 = 1e-3


class SAE:
    """The parameters ([d,F] W_enc and [F,d] W_dec, as saejax lays them out) and Adam."""

    def __init__(self, d: int, f: int, device: torch.device):
        gen = torch.Generator(device="cpu").manual_seed(0)
        w_dec = torch.randn(f, d, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.w_enc = w_dec.T.contiguous().to(device).requires_grad_()  # W_dec transposed
        self.w_dec = w_dec.to(device).requires_grad_()
        self.b_enc = torch.zeros(f, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d, device=device, requires_grad=True)
        params = [self.w_enc, self.b_enc, self.w_dec, self.b_dec]
        self.opt = torch.optim.Adam(params, lr=1e-4, fused=device.type == "cuda")

    def step(self, x: torch.Tensor, variant: str, k: int) -> torch.Tensor:
        arch, *rest = variant.split("-")
        bf16 = rest[-1] == "bf16"
        cast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
        with cast:
            pre = F.linear(x - self.b_dec, self.w_enc.T, self.b_enc)  # [B,F]
            if arch == "relu":
                f = F.relu(pre)
                x_hat = F.linear(f, self.w_dec.T, self.b_dec)
                l1 = f.abs().sum(dim=-1, dtype=torch.float32).mean()
            else:
                values, idx = pre.topk(k, dim=-1)
                values = F.relu(values)
                if rest[0] == "dense":
                    f = torch.zeros_like(pre).scatter(-1, idx, values)
                    x_hat = F.linear(f, self.w_dec.T, self.b_dec)
                else:
                    x_hat = F.embedding_bag(idx, self.w_dec, per_sample_weights=values.float(),
                                            mode="sum") + self.b_dec
                l1 = 0.0
        loss = (x_hat.float() - x).square().mean() + L1 * l1
        loss.backward()
        with torch.no_grad():
            g, w = self.w_dec.grad, self.w_dec
            g -= (g * w).sum(dim=1, keepdim=True) * w  # the parallel component
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            w /= w.norm(dim=1, keepdim=True)
        return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--n-features", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {VARIANTS}")
    p.add_argument("--steps", type=int, default=3, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    if unknown := sorted(set(names) - set(VARIANTS)):
        p.error(f"--variants: unknown {unknown} (known: {VARIANTS})")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    b, d, f = args.batch, args.d_in, args.n_features
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"B={b} d_in={d} F={f} k={args.k} | torch {torch.__version__} on {name} | "
          f"{args.steps} timed rounds after {args.warmup} warm-up")

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, d, generator=gen).clamp_min(0).to(device)
    sae = SAE(d, f, device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.warmup + args.steps):
        for n in names:
            sync(device)
            t0 = time.perf_counter()
            sae.step(x, n, args.k)
            sync(device)
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"\n{'torch step':<20}{'median s':>10}{'range s':>18}{'tokens/s':>13}")
    for n in names:
        print(f"{n:<20}{med[n]:>10.4f}{min(times[n]):>9.4f}-{max(times[n]):.4f}"
              f"{b / med[n]:>13,.0f}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if peak is not None:
        print(f"peak allocated: {peak / 2**30:.1f} GiB")
    results = {"shape": {"batch": b, "d_in": d, "n_features": f, "k": args.k},
               "device": name, "torch": torch.__version__,
               "steps": {n: {"seconds": med[n], "range": [min(times[n]), max(times[n])]}
                         for n in names},
               "peak_bytes": peak}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
