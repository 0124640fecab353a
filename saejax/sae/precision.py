"""Mixed precision for the SAE's matmuls: what `sae.compute_dtype=bfloat16` computes in bfloat16.

Every family gets the policy through `SAE.pre_activations` and `SAE.decode` (which call `dense`)
and `SAE.dtype`; a family with matmuls of its own (a sparse decode, AuxK) calls `matmul` / `dense`
with `self.dtype`. With `float32` these are the plain products, bit for bit.

What is float32 and what bfloat16 (B tokens, d = d_in, F features):

- float32: the parameters and the Adam moments (the optimizer updates float32 master weights,
  so an update below bfloat16's resolution is not lost: the classic failure of bfloat16
  weights); the parameters' gradients (each weight gradient is a sum over the batch accumulated
  in float32 and returned as float32, likewise the bias gradients); the [B, d] side: inputs x,
  the reconstruction x̂ (float32 output of the decoder), its error, the loss; every metric and
  every reduction (`jnp.sum(..., dtype=float32)` for L1 sums over F; `saejax.sae.stats`).
- bfloat16: the inputs of the large products ([B,d]@[d,F] encoder, [B,F]@[F,d] decoder and
  their backward products), each accumulated in float32; and the [B, F] tensors between them:
  pre-activations, codes f and their gradients, so the ReLU (or top-k) and its backward pass
  read and write half the bytes.
  Those dominate a step once the matmuls run at bfloat16 speed: a probe on an H200 with only the
  matmul inputs cast ran at 1.13x float32, its float32 [B, F] passes taking the rest.

A product whose output is bfloat16 (the [B, F] pre-activations, the codes' gradient) is
accumulated in float32 by the backend and rounded once on output (cuBLAS/cuDNN compute type,
the TPU MXU's accumulator; XLA:CPU computes bfloat16 dots in float32); one whose output is
float32 asks for it with `preferred_element_type`.

Why the drift is bounded. bfloat16 keeps 8 significant bits: each rounding is a relative error
at most u = 2^-9 (0.2%). The product of two bfloat16 numbers is exact in float32, so an encoder
pre-activation carries at most 3u·Σ_i|x̄_i W_ij| of error (inputs, weights, output rounding),
~1e-3 of its scale for random-signed terms. The codes then differ from float32's by that much,
and discretely only where a pre-activation lies within that of a decision: the ReLU's 0 (45
mask flips of 65,536 codes in tests/test_bf16.py) or the k-th largest (TopK may pick the other
of two latents that close, whose contributions nearly agree). The loss and the metrics are
computed in float32 from x̂, so they see these perturbations and no rounding of their own. One
step at B=1024 (tests/test_bf16.py): loss within 5e-6 (ReLU) and 1e-3 (TopK) of float32,
gradients within 1% and 2% (relative norm); the discrete part averages out over the batch, as
1/sqrt(B). Because the weights and Adam moments stay float32, these errors do not accumulate in
the parameters the way bfloat16 weight updates would: each step's update is perturbed by O(u),
far below a batch's gradient noise, and training ends where float32 does (MMCS within 0.01 of
float32 on synthetic superposition data, tests/test_bf16.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""`sae.compute_dtype` -> the dtype of matmul inputs and [B, F] intermediates."""


def compute_dtype(cfg) -> jnp.dtype:
    """The compute dtype of an `SAEConfig`."""
    return jnp.dtype(DTYPES[cfg.compute_dtype])


def _dot(a: jax.Array, b: jax.Array, dims: tuple[int, int], out: Any) -> jax.Array:
    """Contract axis dims[0] of a with axis dims[1] of b (2-D), result in `out`; a float32
    result is accumulated in float32 explicitly, a narrower one by the backend (module doc)."""
    return jax.lax.dot_general(a, b, (((dims[0],), (dims[1],)), ((), ())),
                               preferred_element_type=out)


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None, dtype: Any,
          out: Any = None) -> jax.Array:
    """x @ w + b for x [N, k], w [k, n], b [n] (or None), with x and w rounded to `dtype`.

    float32 `dtype`: the plain float32 expression, bit for bit. Otherwise the product is
    accumulated in float32 and returned in `out` (default `dtype`; float32 for a result the loss
    reads directly, like x̂), b added in `out`; the gradients of x, w and b have their own
    dtypes, w's and b's summed over the N rows in float32, and the backward products take
    bfloat16 inputs too (autodiff's own transpose would multiply a float32 cotangent by a
    bfloat16 operand, i.e. a float32 matmul)."""
    dtype = jnp.dtype(dtype)
    out = dtype if out is None else jnp.dtype(out)
    if dtype == jnp.float32:
        y = x @ w
        return (y if b is None else y + b).astype(out)
    x_dtype, w_dtype = x.dtype, w.dtype

    @jax.custom_vjp
    def f(x, w, b):
        return _forward(x.astype(dtype), w.astype(dtype), b)

    def _forward(xc, wc, b):
        y = _dot(xc, wc, (1, 0), out)
        return y if b is None else y + b.astype(out)

    def fwd(x, w, b):
        xc, wc = x.astype(dtype), w.astype(dtype)
        return _forward(xc, wc, b), (xc, wc, b)

    def bwd(res, g):
        xc, wc, b = res
        gc = g.astype(dtype)
        dx = _dot(gc, wc, (1, 1), x_dtype)   # [N,n]·[k,n] -> [N,k]
        dw = _dot(xc, gc, (0, 0), w_dtype)   # [N,k]·[N,n] -> [k,n], float32 sum over N
        db = None if b is None else g.sum(axis=0, dtype=jnp.float32).astype(b.dtype)
        return dx, dw, db

    f.defvjp(fwd, bwd)
    return f(x, w, b)


def matmul(a: jax.Array, b: jax.Array, dtype: Any, out: Any = None) -> jax.Array:
    """a @ b ([N, k] @ [k, n]) under the policy of `dense` (no bias)."""
    return dense(a, b, None, dtype, out)
