"""Sparse TopK: the code of a batch as (values [B,k], indices [B,k]), never a dense [B,F].

    select:  pre = W_enc(x − b_dec) + b_enc, computed piece by piece over the features, each
             piece's top k kept as candidates, then the top k of the candidates (exact)
    decode:  x̂_b = Σ_j v_bj · W_dec[i_bj]                  (a gather-sum of k decoder rows)
    grads:   dW_dec[i_bj] += v_bj·dx̂_b, dv_bj = dx̂_b·W_dec[i_bj]   (scatter-add / gathered dots)
             dW_enc[:, i_bj] += dv_bj·(x_b − b_dec), db_enc[i_bj] += dv_bj, db_dec = −W_enc·db_enc
             (the gradient wrt the pre-activations is zero off the selected entries, so the
             encoder's backward is a scatter of B·k rows, not a [d,B]@[B,F] product)

The dense TopK step does six [B,d]×[d,F]-sized products and keeps several [B,F] arrays; this
one does one product (the encoder's forward), in pieces of at most BLOCK_ELEMENTS, and its other
work is O(B·k·d), in blocks of rows of at most BLOCK_ELEMENTS. Selection and decoding are
`custom_vjp`s, so the backward is exactly the above. AuxK's selection (the top k_aux among the
dead latents) comes from the same pass over the encoder (a piece holding no dead latent skips
it), and its backward runs only when some latent is dead.

Precision: the encoder product follows `sae.compute_dtype` (`saejax.sae.precision`), and so do
the selected values and the top-k; gathers, scatters and gradients are float32 (they move k rows
per token; they are not matmuls).

Feature sharding. Every function here runs on local shards: under a mesh (the step traces under
its abstract mesh) it is a `shard_map` over all mesh axes, specs from the logical-axis rules
table (`saejax.axes`), so no mesh axis is named here. Each feature shard selects its own top k,
the k × shards candidates are gathered (a [B, k·shards] all-gather, not [B,F]) and reduced to
the global top k; decoding, each shard gathers the rows of W_dec it holds for the selected
indices in its range (zeros elsewhere) and the partial reconstructions are summed (`psum`).
Parameter gradients are summed over the batch shards. Without a mesh the same functions run
with no collectives (offset 0).

Selection is exact: `top_k` equals `lax.top_k`, ties included (see there).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from saejax import axes
from saejax.sae import batching, precision

TWO_STAGE_CHUNK = 1024
"""Features per first-stage chunk of `top_k` on GPU/TPU, where XLA's one-stage top-k over a long
row is the bottleneck (H200, [4096, 131072], k=32: 35 ms one-stage, 22 ms in chunks of 1024
(float32)). On CPU the one-stage `lax.top_k` is faster ([4096, 65536], k=32: 0.42 s against
2.7 s for chunks of 1024, 2 cores), so it is used there."""

BLOCK_ELEMENTS = 1 << 24
"""The largest temporary a piece of work materialises, in elements (64 MiB in float32): the
encoder's [B, piece] output (pre-activations are computed and reduced to candidates one piece of
features at a time), and the [rows, k, d] gathered decoder rows or gradient updates (formed a
block of rows at a time)."""


def top_k(x: jax.Array, k: int, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the k largest entries of each row of x [..., n], as `lax.top_k`.

    With `chunk` (dividing n, ≥ k), in two stages: the top k of each chunk of `chunk` entries,
    then the top k of those candidates. Exact, ties included: `lax.top_k` orders equal values by
    index, and the candidates keep that order (chunk by chunk, each in `lax.top_k` order), so
    the second stage picks the same entries in the same order. Any entry of the global top k is
    in its chunk's top k (fewer than k entries precede it there). Falls back to one stage when
    the chunks would not shrink the row."""
    n = x.shape[-1]
    if chunk is None or n % chunk or k > chunk or (n // chunk) * k >= n // 2:
        v, i = lax.top_k(x, k)
        return v, i
    v, i = lax.top_k(x.reshape(*x.shape[:-1], n // chunk, chunk), k)
    i = i + jnp.arange(0, n, chunk, dtype=i.dtype)[:, None]
    return _top_of_candidates(v.reshape(*x.shape[:-1], -1), i.reshape(*x.shape[:-1], -1), k)


def _top_of_candidates(v: jax.Array, i: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The top k of candidate values v [B, c] with their indices i [B, c]."""
    v, j = lax.top_k(v, k)
    return v, jnp.take_along_axis(i, j, axis=-1)


def platform_chunk() -> int | None:
    """The first-stage chunk `top_k` uses on this platform (None: one stage)."""
    return None if jax.default_backend() == "cpu" else TWO_STAGE_CHUNK


# ---------------------------------------------------------------- local shards


@dataclass(frozen=True)
class Shards:
    """Where a function runs: the mesh axes splitting the batch and the features inside its
    `shard_map` (None: not split, e.g. no mesh)."""

    batch: str | None = None
    features: str | None = None

    def offset(self, n_local: int) -> jax.Array | int:
        """Global index of this shard's first feature."""
        return 0 if self.features is None else lax.axis_index(self.features) * n_local

    def sum_features(self, x):
        return x if self.features is None else lax.psum(x, self.features)

    def sum_batch(self, x):
        return x if self.batch is None else lax.psum(x, self.batch)

    def gather_features(self, x: jax.Array) -> jax.Array:
        """[b, c] per shard -> [b, c·shards], shard by shard (in feature order)."""
        return x if self.features is None else lax.all_gather(x, self.features, axis=1,
                                                              tiled=True)


def on_shards(fn: Callable, in_axes: tuple, out_axes) -> Callable:
    """fn(shards, *local arrays) as a function of global arrays laid out by the logical axes
    `in_axes` / `out_axes` (one tuple of names per array; None for an argument that is not an
    array, passed through): a `shard_map` over every axis of the mesh in context, else fn
    itself on the whole arrays."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return partial(fn, Shards())
    names = set(mesh.axis_names)
    ctx = Shards(*(a if a in names else None
                   for a in (axes.mesh_axis("batch"), axes.mesh_axis("d_sae"))))
    spec = lambda t: jax.tree.map(axes.logical_spec, t, is_leaf=_is_axes)
    # check_vma off: the functions sum over shards themselves (`Shards`), and no autodiff runs
    # through the shard_map (the custom_vjps below sit outside it).
    return jax.shard_map(partial(fn, ctx), mesh=mesh, in_specs=spec(in_axes),
                         out_specs=spec(out_axes), check_vma=False)


def _is_axes(a) -> bool:
    """A tuple of logical axis names (one array's layout), not a container of them."""
    return isinstance(a, tuple) and all(isinstance(e, (str, type(None))) for e in a)


def _local(idx: jax.Array, shards: Shards, n_local: int) -> jax.Array:
    """Global feature indices -> indices into this shard's rows; n_local (out of range: dropped
    by scatters, zero-filled by gathers) for features another shard holds."""
    local = idx - shards.offset(n_local)
    return jnp.where((local >= 0) & (local < n_local), local, n_local)


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of n that is at most `limit` (1 if limit < 1)."""
    small = [p for p in range(1, int(n**0.5) + 1) if n % p == 0]
    return max(p for p in small + [n // p for p in small] if p <= max(limit, 1))


def _block_rows(rows: int, per_row: int) -> int:
    """Rows per block: the most rows (a divisor of `rows`) whose block has at most
    BLOCK_ELEMENTS elements of `per_row` each (at least 1)."""
    return _largest_divisor(rows, BLOCK_ELEMENTS // max(per_row, 1))


def _map_blocks(fn: Callable, per_row: int, *arrays: jax.Array) -> jax.Array:
    """fn(*arrays) for row-wise fn on arrays [B, ...], computed BLOCK_ELEMENTS at a time."""
    rows = arrays[0].shape[0]
    r = _block_rows(rows, per_row)
    if r == rows:
        return fn(*arrays)
    out = lax.map(lambda blk: fn(*blk), tuple(a.reshape(rows // r, r, *a.shape[1:])
                                              for a in arrays))
    return out.reshape(rows, *out.shape[2:])


def _rows(w: jax.Array, idx: jax.Array) -> jax.Array:
    """[..., d]: rows idx of w [n, d]; zeros where idx == n."""
    return jnp.take(w, idx, axis=0, mode="fill", fill_value=0)


def gather_sum(w: jax.Array, idx: jax.Array, weights: jax.Array) -> jax.Array:
    """[B, d]: Σ_j weights[b, j]·w[idx[b, j]] for w [n, d] (idx == n: a zero row)."""
    fn = lambda idx, weights: jnp.einsum("bk,bkd->bd", weights, _rows(w, idx))  # noqa: E731
    return _map_blocks(fn, idx.shape[1] * w.shape[1], idx, weights)


def gather_dot(w: jax.Array, idx: jax.Array, g: jax.Array) -> jax.Array:
    """[B, k]: g[b]·w[idx[b, j]] for w [n, d], g [B, d] (idx == n: 0)."""
    fn = lambda idx, g: jnp.einsum("bd,bkd->bk", g, _rows(w, idx))  # noqa: E731
    return _map_blocks(fn, idx.shape[1] * w.shape[1], idx, g)


def scatter_rows(n: int, idx: jax.Array, weights: jax.Array, rows: jax.Array) -> jax.Array:
    """[n, d]: Σ over (b, j) of weights[b, j]·rows[b] added at row idx[b, j] (idx == n:
    dropped); the transpose of `gather_sum` in w. Updates are formed a block of rows at a time."""
    b, k = idx.shape
    r = _block_rows(b, k * rows.shape[1])

    def add(total, blk):
        idx, weights, rows = blk
        return total.at[idx].add(weights[..., None] * rows[:, None, :], mode="drop"), None

    blocks = tuple(a.reshape(b // r, r, *a.shape[1:]) for a in (idx, weights, rows))
    return lax.scan(add, jnp.zeros((n, rows.shape[1]), rows.dtype), blocks)[0]


# ---------------------------------------------------------------- selection


def _piece_size(n: int, rows: int, k: int) -> int:
    """Features per piece: the most (a divisor of n) with rows × piece ≤ BLOCK_ELEMENTS, at
    least k (n itself when no divisor fits well)."""
    target = max(BLOCK_ELEMENTS // max(rows, 1), k)
    if n <= target:
        return n
    best = _largest_divisor(n, target)
    return best if best * 4 >= target else n


def _select_local(shards: Shards, x, b_dec, w_enc, b_enc, masks, *, ks: tuple[int, ...], dtype):
    """Per shard, `select`'s selections, exchanged with the other feature shards: (values
    [B,k] in `dtype`, global indices [B,k]) for each k."""
    n = w_enc.shape[1]
    xbar = x - b_dec
    kk = tuple(min(k, n) for k in ks)  # a shard may hold fewer than k features
    piece = _piece_size(n, x.shape[0], max(kk))
    chunk = platform_chunk()
    lowest = jnp.finfo(jnp.dtype(dtype)).min

    def candidates(start):
        w = lax.dynamic_slice_in_dim(w_enc, start, piece, axis=1)
        b = lax.dynamic_slice_in_dim(b_enc, start, piece)
        pre = precision.dense(xbar, w, b, dtype)
        out = [top_k(pre, kk[0], chunk)]
        for k, mask in zip(kk[1:], masks[1:]):
            m = lax.dynamic_slice_in_dim(mask, start, piece)
            # A piece with no feature in the mask (AuxK's dead latents: usually all of them)
            # skips its top-k; its candidates are the lowest value.
            out.append(lax.cond(m.any(), lambda: top_k(jnp.where(m, pre, lowest), k, chunk),
                                lambda: (jnp.full((pre.shape[0], k), lowest, pre.dtype),
                                         jnp.broadcast_to(jnp.arange(k), (pre.shape[0], k)))))
        return [(v, i + start) for v, i in out]

    starts = jnp.arange(0, n, piece)
    per_piece = lax.map(candidates, starts) if len(starts) > 1 else \
        jax.tree.map(lambda a: a[None], candidates(0))
    out = []
    for k, (v, i) in zip(ks, per_piece):  # [pieces, B, k] -> [B, pieces·k], piece order
        v, i = (a.transpose(1, 0, 2).reshape(a.shape[1], -1) for a in (v, i))
        if v.shape[1] > k:
            v, i = _top_of_candidates(v, i, k)
        i = i + shards.offset(n)
        v, i = shards.gather_features(v), shards.gather_features(i)
        out.append(_top_of_candidates(v, i, k) if v.shape[1] > k else (v, i))
    return tuple(out)


def _select_grads_local(shards: Shards, x, b_dec, w_enc, idx, dv):
    """Per shard: gradients of (x, b_dec, W_enc, b_enc) from dv [B,k], the cotangent of the
    pre-activations selected at global indices idx [B,k] (zero elsewhere)."""
    n = w_enc.shape[1]
    local = _local(idx, shards, n)
    dv = dv.astype(jnp.float32)
    xbar = x - b_dec
    db_enc = jnp.zeros((n,), jnp.float32).at[local].add(dv, mode="drop")
    # Scattered as [n, d] rows (contiguous) and transposed once.
    dw_enc = scatter_rows(n, local, dv, xbar).T
    db_dec = -(w_enc @ db_enc)
    # x's gradient (dead code in the train step, which differentiates the parameters only).
    dx = shards.sum_features(gather_sum(w_enc.T, local, dv))
    return (dx, shards.sum_features(shards.sum_batch(db_dec)), shards.sum_batch(dw_enc),
            shards.sum_batch(db_enc))


_SELECT_IN = (("batch", "d_in"), ("d_in",), ("d_in", "d_sae"), ("d_sae",))
_CODE = ("batch", None)


def _selected(ks, dtype, x, b_dec, w_enc, b_enc, masks):
    fn = on_shards(partial(_select_local, ks=ks, dtype=dtype),
                   (*_SELECT_IN, tuple(None if m is None else ("d_sae",) for m in masks)),
                   tuple((_CODE, _CODE) for _ in ks))
    return fn(x, b_dec, w_enc, b_enc, masks)


_select = jax.custom_vjp(_selected, nondiff_argnums=(0, 1))


def _select_fwd(ks, dtype, x, b_dec, w_enc, b_enc, masks):
    out = _selected(ks, dtype, x, b_dec, w_enc, b_enc, masks)
    return out, (x, b_dec, w_enc, tuple(i for _, i in out), masks)


def _select_bwd(ks, dtype, res, cot):
    x, b_dec, w_enc, indices, masks = res
    grads = on_shards(_select_grads_local, (*_SELECT_IN[:3], _CODE, _CODE), _SELECT_IN)

    def add(total, i, dv):
        return jax.tree.map(jnp.add, total, grads(x, b_dec, w_enc, i, dv))

    total = grads(x, b_dec, w_enc, indices[0], cot[0][0])
    for i, (dv, _), mask in zip(indices[1:], cot[1:], masks[1:]):
        # A masked selection (AuxK's dead latents) contributes only when the mask has a latent;
        # otherwise its cotangent is zero and the scatter is skipped.
        total = batching.cond(mask.any(), add, lambda t, i, dv: t, total, i, dv)
    return (*total, tuple(None for _ in masks))


_select.defvjp(_select_fwd, _select_bwd)


def select(x: jax.Array, b_dec: jax.Array, w_enc: jax.Array, b_enc: jax.Array,
           ks: tuple[int, ...], masks: tuple[jax.Array | None, ...], dtype=jnp.float32
           ) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """For each k of `ks`: (values [B,k], indices [B,k]) of the k largest pre-activations
    W_enc(x − b_dec) + b_enc of each input, in `lax.top_k`'s order: the first over all features
    (its mask None), each further one over the features where its mask ([F] bool) is true (a
    mask with fewer than k features: the rest are the dtype's lowest value). One pass over the
    encoder serves all. Values are in `dtype` (the encoder product's, `saejax.sae.precision`)
    and differentiable with the sparse backward of the module doc."""
    assert ks and masks[0] is None and None not in masks[1:], "first over all, then masked"
    return _select(tuple(ks), jnp.dtype(dtype), x, b_dec, w_enc, b_enc, tuple(masks))


# ---------------------------------------------------------------- decoding


def _decode_local(shards: Shards, values, idx, w_dec):
    return shards.sum_features(gather_sum(w_dec, _local(idx, shards, w_dec.shape[0]), values))


def _decode_grads_local(shards: Shards, values, idx, w_dec, g):
    n = w_dec.shape[0]
    local = _local(idx, shards, n)
    dvalues = shards.sum_features(gather_dot(w_dec, local, g))
    return dvalues, shards.sum_batch(scatter_rows(n, local, values, g))


_DEC_IN = (_CODE, _CODE, ("d_sae", "d_in"))


def _decoded(values: jax.Array, idx: jax.Array, w_dec: jax.Array) -> jax.Array:
    return on_shards(_decode_local, _DEC_IN, ("batch", "d_in"))(
        values.astype(jnp.float32), idx, w_dec)


_decode = jax.custom_vjp(_decoded)


def _decode_fwd(values, idx, w_dec):
    return _decoded(values, idx, w_dec), (values, idx, w_dec)


def _decode_bwd(res, g):
    values, idx, w_dec = res
    dv, dw = on_shards(_decode_grads_local, (*_DEC_IN, ("batch", "d_in")),
                       (_CODE, ("d_sae", "d_in")))(values.astype(jnp.float32), idx, w_dec, g)
    return dv.astype(values.dtype), None, dw


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode(values: jax.Array, idx: jax.Array, w_dec: jax.Array) -> jax.Array:
    """Σ_j values[b,j]·W_dec[idx[b,j]] ([B,d] float32; no bias): the decoder on a sparse code
    (values, indices [B,k]). Its backward recomputes the [B,k,d] gather rather than keeping it."""
    return _decode(values, idx, w_dec)


# ---------------------------------------------------------------- firing


def _fire_counts_local(shards: Shards, idx, fired, counts):
    local = _local(idx, shards, counts.shape[0])
    return shards.sum_batch(counts.at[local].add(fired.astype(counts.dtype), mode="drop"))


def fire_counts(idx: jax.Array, fired: jax.Array, n_features: int) -> jax.Array:
    """int32 [F]: on how many inputs each feature fired, from the code's indices [B,k] and
    which of them fired (bool [B,k])."""
    return on_shards(_fire_counts_local, (_CODE, _CODE, ("d_sae",)), ("d_sae",))(
        idx, fired, jnp.zeros((n_features,), jnp.int32))
