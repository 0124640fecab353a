"""On-the-fly activations: LM forward -> on-device shuffle buffer -> SAE batches, no disk.

`OnTheFlyFeed` runs a language model over a token dataset inside jitted functions and serves the
SAE training loop global batches that never leave the devices. Everything is a pure function of
the step, like the host-side sources (`saejax.data.source`): the batch of step s depends only on
(s, seed, geometry, LM, tokens). Which (context, position) lands in which batch row does not
depend on the mesh either; the LM's own arithmetic may differ in the last bits between meshes
(per-device batch shapes change matmul blocking), and is bitwise repeatable on one mesh.

Row stream. Contexts are taken in a seeded per-epoch permutation of the token dataset
(`shuffle_contexts=True`; else in order), epochs laid end to end. Each context gives
R = ctx_len - drop rows, one per position (`drop_bos` drops position 0: see below). The rows,
context after context, form one infinite stream; harvest h is stream rows [h*H, (h+1)*H).

Buffer. `buffer_size` = 2H rows x d on device, two slots of H rows, slot h % 2 holding harvest
h. A harvest runs the LM on the contexts that cover its rows, writes them into its slot, and
shuffles them with a key derived from (seed, h) (`shuffle_key`). Each slot is split into V
`blocks` of L = H/V rows, sharded over the mesh's `data` axis (V a multiple of its size), and
harvest h's rows for block v are stream rows [h*H + v*L, h*H + (v+1)*L): each block runs the LM
on its own contexts (a context cut by a block boundary runs in both blocks, and the count is
rounded up to whole LM calls: `describe()["lm_overhead"]` = LM tokens per row - 1, 6% at
H=131072, V=16, ctx 128, lm_batch_contexts=64, 0.8% of it the dropped BOS), so harvesting
moves no rows between devices. The shuffle (`shuffle="blocks"`) permutes
rows within each block, sends 1/V of every block to every other block (one all-to-all), and
permutes within blocks again: every block, hence every served batch, holds rows from all of the
harvest's contexts. `shuffle="global"` applies one permutation of all H rows instead (a gather
over devices; for comparison, see bench/onthefly_stall.py).

Schedule (S = H/B steps per harvest, B the global batch). The first S/2 steps serve the first
half of harvest 0 (B/V rows from each block per batch). After that, "cycle" c >= 1 is S steps
that serve the second half of harvest c-1 and the first half of harvest c, B/(2V) rows of each
per block per batch. So every harvested row is served exactly once (but the unused tail of the
last harvest), every batch mixes two harvests (~2H/R contexts), and at the start of cycle c the
slot of harvest c-2 (fully served) is refilled with harvest c: refill half, serve half. The
buffer holds at most two harvests, so the buffer at any step is a function of the step:
`seek(step)` rebuilds it with two harvests, and a resumed run needs no saved buffer at all.

Overlap. JAX dispatches asynchronously: `batch(step)` dispatches the refill (LM forward, write,
shuffle) when a cycle starts and then the batch's slice, and returns at once; the host reads
nothing back. The next harvest's tokens are gathered and sent to the devices right after a
refill is dispatched, while the device works. A device runs one program at a time, so the
LM forward adds its compute time to the SAE's; what feeding must not add is host stalls on top
(bench/onthefly_stall.py measures both).

BOS. Shapes are fixed on device, so `drop_bos` drops position 0 of every context and requires
that every context starts with BOS (checked on the host for every harvested context; pack token
datasets with bos="every_context"). BOS tokens *inside* contexts (GPT-2's `<|endoftext|>` as a
document separator) are kept, unlike the disk store (`saejax.data.store`), which drops every
BOS position.

Memory: 2H x d buffer (the LM site's dtype: float32, or bfloat16 for an LM run in bfloat16,
whose batches then stay bfloat16 until the train step widens them), plus during a refill the
harvest (~H x d) and the shuffle's temporaries (2 x H x d), all sharded over `data`. LM
parameters follow the rules table (`saejax.sharding`, replicated today).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax
from jax.sharding import Mesh, NamedSharding

from saejax import sharding
from saejax.data.order import epoch_order
from saejax.hashmix import mix32

HarvestFn = Callable[[Any, jax.Array], jax.Array]
"""harvest_fn(params, tokens int32 [n, ctx_len]) -> activations [n, ctx_len, d] (jittable)."""


# ---------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shapes of a feed; every check names the argument to change."""

    batch_size: int  # B
    buffer_size: int  # 2H
    blocks: int  # V
    ctx_len: int  # T
    drop: int  # 1 if drop_bos else 0
    lm_batch_contexts: int  # contexts per LM forward call, all blocks together

    @property
    def half(self) -> int:
        """H: rows per harvest (one slot)."""
        return self.buffer_size // 2

    @property
    def rows_per_context(self) -> int:
        return self.ctx_len - self.drop

    @property
    def block_rows(self) -> int:
        """L = H / V."""
        return self.half // self.blocks

    @property
    def steps_per_harvest(self) -> int:
        """S = H / B."""
        return self.half // self.batch_size

    @property
    def _need(self) -> int:
        """Contexts that cover L rows at any start offset (offsets are multiples of gcd(L, R))."""
        L, R = self.block_rows, self.rows_per_context
        return -(-(L + R - math.gcd(L, R)) // R)

    @property
    def n_chunks(self) -> int:
        """LM calls per harvest."""
        return -(-self._need // (self.lm_batch_contexts // self.blocks))

    @property
    def contexts_per_chunk(self) -> int:
        """Contexts per block in one LM call (at most lm_batch_contexts / V, as few as cover
        the block in n_chunks calls)."""
        return -(-self._need // self.n_chunks)

    @property
    def contexts_per_block(self) -> int:
        """Contexts each block runs per harvest."""
        return self.n_chunks * self.contexts_per_chunk

    @property
    def lm_tokens_per_harvest(self) -> int:
        return self.blocks * self.contexts_per_block * self.ctx_len

    def newest(self, step: int) -> int:
        """Index of the newest harvest that step `step`'s batch draws from."""
        return (step + self.steps_per_harvest // 2) // self.steps_per_harvest

    def check(self, n_data: int) -> None:
        B, V, T = self.batch_size, self.blocks, self.ctx_len
        if min(B, self.buffer_size, V, self.lm_batch_contexts) < 1:
            raise ValueError(f"batch_size, buffer_size, blocks and lm_batch_contexts must be "
                             f">= 1, got {self}")
        if T - self.drop < 1:
            raise ValueError(f"ctx_len={T} leaves no rows with drop_bos={bool(self.drop)}")
        if V % n_data:
            raise ValueError(f"blocks={V} must be a multiple of the mesh's data axis ({n_data})")
        if B % (2 * V):
            raise ValueError(f"batch_size={B} must be a multiple of 2*blocks={2 * V} (each batch "
                             f"takes B/(2V) rows from each block of each of two harvests)")
        if self.buffer_size % (4 * B):
            raise ValueError(f"buffer_size={self.buffer_size} must be a multiple of "
                             f"4*batch_size={4 * B} (two slots of H rows, H a multiple of 2B)")
        if self.half % (V * V):
            raise ValueError(f"buffer_size/2={self.half} must be a multiple of blocks^2={V * V} "
                             f"(the shuffle sends 1/V of each block to every block)")
        if self.lm_batch_contexts % V:
            raise ValueError(f"lm_batch_contexts={self.lm_batch_contexts} must be a multiple of "
                             f"blocks={V} (each LM call runs the same number of contexts per "
                             f"block)")


# ---------------------------------------------------------------- host side: which contexts


class _Contexts:
    """A [N, ctx_len] int array with TokenDataset's take/len/ctx_len/bos_id."""

    def __init__(self, tokens: np.ndarray, bos_id: int | None):
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 2:
            raise ValueError(f"contexts must be [N, ctx_len], got shape {self.tokens.shape}")
        self.ctx_len = int(self.tokens.shape[1])
        self.bos_id = bos_id

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, idx) -> np.ndarray:
        return np.asarray(self.tokens[np.asarray(idx)], np.int32)


def context_ids(q: np.ndarray, n: int, seed: int, shuffle: bool) -> np.ndarray:
    """Dataset index of the contexts at stream positions `q` (epoch e = q // n is a permutation
    of range(n) seeded by (seed, e), or range(n) itself without shuffling)."""
    q = np.asarray(q, np.int64)
    if not shuffle:
        return q % n
    return epoch_order(q, n, lambda e: (seed, e, 0x6F74))


# ---------------------------------------------------------------- shuffling


def shuffle_key(seed: int, h: jax.Array) -> jax.Array:
    """uint32 key of harvest h's shuffle. A counter-based hash rather than threefry: the same
    values on any mesh, and it compiles in ~0.1 s where threefry's bits take ~1.2 s on CPU."""
    return mix32(mix32(jnp.uint32(seed & 0xFFFFFFFF) ^ jnp.uint32(0x9E3779B9))
                  ^ jnp.asarray(h).astype(jnp.uint32))


# ---------------------------------------------------------------- the state


@struct.dataclass
class FeedState:
    """Everything `OnTheFlyFeed` carries across steps, on the devices."""

    slots: jax.Array
    """[2, H, d] (buffer dtype), rows over `data`: slot h % 2 holds shuffled harvest h."""
    step: jax.Array
    """int32 scalar: batches served so far (the next batch is step `step`'s)."""
    harvest: jax.Array
    """int32 scalar: index of the newest harvest in the slots."""


def lm_param_shardings(params, mesh: Mesh):
    """Shardings of an LM's nnx.State from the parameters' logical axes and the rules table."""
    flat = [(p, v.replace(value=sharding.named(mesh, v.get_metadata().get("out_sharding"))))
            for p, v in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def _put(x, sh: NamedSharding) -> jax.Array:
    """A global array of the (host or single-device) value x, laid out as `sh`; with several
    processes every process passes the same full value and keeps its own shards."""
    if jax.process_count() == 1:
        return jax.device_put(x, sh)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


# ---------------------------------------------------------------- the feed


class OnTheFlyFeed:
    """Serves step-addressed global batches [B, d] from an on-device LM activation buffer.

    harvest_fn(params, tokens [n, T] int32) -> [n, T, d]: the jittable LM forward (see
        `from_lm`); params its parameters (a pytree), laid out as `param_shardings`
        (default replicated).
    contexts: a `TokenDataset` (or any object with len, take(indices), ctx_len, bos_id), or an
        int array [N, T].
    batch_size: global batch B. buffer_size: 2H rows on device. blocks: V (see module doc).
    lm_batch_contexts: at most this many contexts per LM call (memory of one forward), a
        multiple of V.
    drop_bos: drop position 0 of every context (each must start with bos_id; default
        contexts.bos_id). seed: context order and shuffles. dtype: buffer dtype, which batches
        are served in (`batch_dtype`; `sample` rows are float32); None: the dtype harvest_fn
        gives, so nothing is rounded (bfloat16 activations of a bfloat16 LM stay bfloat16).

    A `saejax.data.provider.BatchProvider`: `batch(step)` for consecutive steps (another step
    seeks: two harvests), `batches(start, stop)` for the loop, `sample(n, seed)` for statistics.
    """

    def __init__(self, harvest_fn: HarvestFn, params: Any, contexts, mesh: Mesh, *,
                 batch_size: int, buffer_size: int, lm_batch_contexts: int = 64,
                 blocks: int = 16, drop_bos: bool = True, bos_id: int | None = None,
                 seed: int = 0, shuffle_contexts: bool = True,
                 shuffle: Literal["blocks", "global"] = "blocks",
                 dtype: Any = None, param_shardings: Any = None):
        if isinstance(contexts, np.ndarray):
            contexts = _Contexts(contexts, bos_id)
        if shuffle not in ("blocks", "global"):
            raise ValueError(f"shuffle must be 'blocks' or 'global', got {shuffle!r}")
        self.contexts = contexts
        self.n_contexts = len(contexts)
        if self.n_contexts < 1:
            raise ValueError("the token dataset holds no contexts")
        if drop_bos:
            bos_id = getattr(contexts, "bos_id", None) if bos_id is None else bos_id
            if bos_id is None:
                raise ValueError("drop_bos=True needs bos_id (the contexts carry none); pass "
                                 "bos_id, or drop_bos=False")
        self.bos_id = bos_id
        self.mesh = mesh
        self.seed, self.shuffle_contexts, self.shuffle = seed, shuffle_contexts, shuffle
        g = Geometry(batch_size, buffer_size, blocks, int(contexts.ctx_len), int(bool(drop_bos)),
                     lm_batch_contexts)
        g.check(sharding.axis_size(mesh, "batch"))
        self.geometry = g
        self.harvest_fn = harvest_fn

        rep = sharding.replicated(mesh)
        self.param_shardings = (jax.tree.map(lambda _: rep, params)
                                if param_shardings is None else param_shardings)
        self.params = jax.tree.map(_put, params, self.param_shardings)
        probe = jax.ShapeDtypeStruct((g.lm_batch_contexts, g.ctx_len), jnp.int32)
        out = jax.eval_shape(harvest_fn, params, probe)
        if out.ndim != 3 or out.shape[:2] != probe.shape:
            raise ValueError(f"harvest_fn must map tokens {probe.shape} to [n, T, d], gave "
                             f"{out.shape}")
        self.d_in: int = int(out.shape[2])
        self.dtype = jnp.dtype(out.dtype if dtype is None else dtype)
        self.batch_dtype = self.dtype
        """dtype of the served batches (`saejax.data.provider.BatchProvider`)."""

        self.slots_sharding = sharding.named(mesh, (None, "batch", None))
        self.batch_sharding = sharding.batch_sharding(mesh)
        self._rep = rep
        self._blocks_sh = sharding.named(mesh, ("batch",))  # leading axis of [V, ...] or [b, ...]
        self._chunks_sh = sharding.named(mesh, (None, "batch", None))  # [n_chunks, b, T]
        self._build()
        self._st: FeedState | None = None
        self._next = -1  # host copy of _st.step; -1 = nothing harvested yet
        self._held = -1  # host copy of _st.harvest
        self._pending: dict[int, tuple[jax.Array, jax.Array]] = {}

    @classmethod
    def from_lm(cls, lm, site: str, contexts, mesh: Mesh, **kw) -> "OnTheFlyFeed":
        """A feed of `lm`'s activations at hook site `site` (e.g. blocks.0.mlp.hook_post); the
        forward stops right after the site's layer."""
        if site not in lm.hook_names():
            raise ValueError(f"{site!r} is not a hook site of this LM; sites: {lm.hook_names()}")
        graphdef, params = nnx.split(lm)

        def harvest(params, tokens):
            return nnx.merge(graphdef, params).run_with_cache(tokens, [site])[1][site]

        kw.setdefault("param_shardings", lm_param_shardings(params, mesh))
        return cls(harvest, params, contexts, mesh, **kw)

    # ------------------------------------------------------------ compiled functions

    def _build(self) -> None:
        g, d, V = self.geometry, self.d_in, self.geometry.blocks
        H, L, B, R, T = g.half, g.block_rows, g.batch_size, g.rows_per_context, g.ctx_len
        S, cp, k, n_chunks = (g.steps_per_harvest, g.contexts_per_block, g.contexts_per_chunk,
                              g.n_chunks)
        b = V * k  # contexts per LM call in a refill
        dtype, drop, seed, harvest_fn = self.dtype, g.drop, self.seed, self.harvest_fn
        data = lambda *rest: sharding.named(self.mesh, ("batch", *rest))  # noqa: E731
        wsc = jax.lax.with_sharding_constraint

        def lm_rows(params, tokens):
            """tokens [n_chunks, b, T] -> rows [n_chunks, b, R, d], one LM call per chunk."""
            def body(carry, tok):
                acts = harvest_fn(params, wsc(tok, data(None)))
                return carry, wsc(acts[:, drop:, :].astype(dtype), data(None, None))
            return lax.scan(body, None, tokens)[1]

        def perms(key, shape):
            """Random permutations along the last axis: argsort of a bijective hash of the
            element index (distinct values, so a true permutation; mesh-independent)."""
            i = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
            return jnp.argsort(mix32(mix32(i ^ key) + key), axis=-1)

        def local_perm(x, p):
            """Permute the rows of each block of x [V, L, d] by p [V, L]."""
            return jax.vmap(lambda xb, pb: xb[pb])(x, p)

        def shuffle(x, key):
            if self.shuffle == "global":
                perm = perms(key, (H,))
                return wsc(x.reshape(H, d)[perm].reshape(V, L, d), data(None, None))
            p = perms(key, (2, V, L))
            x = local_perm(x, p[0])
            x = x.reshape(V, V, L // V, d).swapaxes(0, 1).reshape(V, L, d)  # all-to-all
            return local_perm(wsc(x, data(None, None)), p[1])

        def refill(params, slots, tokens, offsets, h):
            """Harvest h into slot h % 2. tokens [V, cp, T], offsets [V] (first row of each
            block's contexts that belongs to it)."""
            tok = tokens.reshape(V, n_chunks, k, T).swapaxes(0, 1).reshape(n_chunks, b, T)
            ys = lm_rows(params, tok)  # [n_chunks, V*k, R, d]
            rows = ys.reshape(n_chunks, V, k * R, d).swapaxes(0, 1).reshape(V, cp * R, d)
            rows = wsc(rows, data(None, None))
            rows = jax.vmap(lambda r, o: lax.dynamic_slice_in_dim(r, o, L))(rows, offsets)
            rows = shuffle(rows, shuffle_key(seed, h))
            return lax.dynamic_update_index_in_dim(slots, rows.reshape(H, d), h % 2, axis=0)

        def serve(slots, step):
            """Step `step`'s batch [B, d] in the buffer dtype (schedule in the module
            docstring)."""
            q = B // (2 * V)
            c = (step + S // 2) // S
            j = (step + S // 2) % S  # position in cycle c (>= S/2 in the warm-up, c == 0)
            warm = c == 0
            slot_a = jnp.where(warm, 0, (c - 1) % 2)
            start_a = jnp.where(warm, 2 * (j - S // 2) * q, L // 2 + j * q)
            slot_b = jnp.where(warm, 0, c % 2)
            start_b = jnp.where(warm, 2 * (j - S // 2) * q + q, j * q)
            x = slots.reshape(2, V, L, d)
            zero = jnp.zeros((), start_a.dtype)
            a = lax.dynamic_slice(x, (slot_a, zero, start_a, zero), (1, V, q, d))[0]
            bb = lax.dynamic_slice(x, (slot_b, zero, start_b, zero), (1, V, q, d))[0]
            return jnp.concatenate([a, bb], axis=1).reshape(B, d), step + 1

        def sample(params, tokens, n):
            ys = lm_rows(params, tokens)
            return ys.reshape(-1, d)[:n].astype(jnp.float32)

        rep, psh, ssh = self._rep, self.param_shardings, self.slots_sharding
        self._refill = jax.jit(refill, in_shardings=(psh, ssh, data(None, None), data(), rep),
                               out_shardings=ssh, donate_argnums=(1,))
        self._serve = jax.jit(serve, in_shardings=(ssh, rep),
                              out_shardings=(self.batch_sharding, rep))
        self._sample = jax.jit(sample, static_argnums=(2,), in_shardings=(psh, self._chunks_sh),
                               out_shardings=self.batch_sharding)
        self._zeros = jax.jit(lambda: jnp.zeros((2, H, d), dtype), out_shardings=ssh)

    # ------------------------------------------------------------ host side

    def plan(self, h: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices of the contexts int64 [V, contexts_per_block], row offsets int32
        [V]) of harvest h: block v's rows are rows offsets[v] .. offsets[v]+L-1 of its contexts'
        rows laid end to end (BOS dropped)."""
        g = self.geometry
        first = h * g.half + np.arange(g.blocks, dtype=np.int64) * g.block_rows  # stream rows
        q0, offsets = np.divmod(first, g.rows_per_context)
        q = q0[:, None] + np.arange(g.contexts_per_block, dtype=np.int64)[None]
        return (context_ids(q, self.n_contexts, self.seed, self.shuffle_contexts),
                offsets.astype(np.int32))

    def _tokens(self, ids: np.ndarray) -> np.ndarray:
        tokens = np.asarray(self.contexts.take(ids.reshape(-1)), np.int32)
        if self.geometry.drop:
            bad = np.flatnonzero(tokens[:, 0] != self.bos_id)
            if len(bad):
                i = int(ids.reshape(-1)[bad[0]])
                raise ValueError(
                    f"context {i} starts with token {int(tokens[bad[0], 0])}, not BOS "
                    f"{self.bos_id}: drop_bos drops position 0 of every context, so every "
                    f"context must start with BOS (pack with bos='every_context'), or use "
                    f"drop_bos=False")
        return tokens.reshape(*ids.shape, -1)

    def _send(self, h: int) -> None:
        """Gather harvest h's tokens and start sending them (and the offsets) to the devices;
        called right after the previous refill is dispatched, so it overlaps device work."""
        if h not in self._pending:
            ids, offsets = self.plan(h)
            self._pending[h] = (_put(self._tokens(ids), self._blocks_sh),
                                _put(offsets, self._blocks_sh))

    def _harvest(self, h: int) -> None:
        self._send(h)
        tokens, offsets = self._pending.pop(h)
        h_dev = _put(np.int32(h), self._rep)
        slots = self._refill(self.params, self._st.slots, tokens, offsets, h_dev)
        self._st = self._st.replace(slots=slots, harvest=h_dev)
        self._held = h
        self._pending = {k: v for k, v in self._pending.items() if k > h}
        self._send(h + 1)

    # ------------------------------------------------------------ public

    @property
    def steps_per_harvest(self) -> int:
        return self.geometry.steps_per_harvest

    def seek(self, step: int) -> None:
        """Rebuild the buffer for step `step` from scratch (one or two harvests)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        c = self.geometry.newest(step)
        self._pending.clear()
        slots = self._zeros() if self._st is None else self._st.slots
        self._st = FeedState(slots=slots, step=_put(np.int32(step), self._rep),
                             harvest=_put(np.int32(-1), self._rep))
        for h in ([c - 1, c] if c >= 1 else [0]):
            self._harvest(h)
        self._next = step

    def batch(self, step: int) -> jax.Array:
        """The global batch [B, d] (`batch_dtype`) of training step `step` (sharded over
        `data`).

        Consecutive calls (step = previous + 1) cost a slice, plus a refill at the start of a
        cycle; any other step seeks first. Nothing is read back to the host."""
        if step != self._next:
            self.seek(step)
        c = self.geometry.newest(step)
        if c > self._held:  # c == held + 1: refill the fully served slot
            self._harvest(c)
        out, step_dev = self._serve(self._st.slots, self._st.step)
        self._st = self._st.replace(step=step_dev)
        self._next = step + 1
        return out

    def batches(self, start: int, stop: int) -> "FeedBatches":
        """The loop's view: `.next()` returns the batches of steps start, start+1, ..."""
        return FeedBatches(self, start, stop)

    def sample(self, n: int, seed: int) -> jax.Array:
        """n rows [n, d] float32 sharded over `data` (n a multiple of its size) for statistics
        (geometric median, input scale, resampling, evaluation): all positions (BOS dropped) of
        ceil(n/R) contexts drawn with numpy seeded by `seed` (without replacement when the
        dataset has enough), deterministic in (seed, n) and independent of the mesh."""
        g, n_data = self.geometry, sharding.axis_size(self.mesh, "batch")
        if n < 1 or n % n_data:
            raise ValueError(f"sample size n={n} must be a positive multiple of the data axis "
                             f"({n_data})")
        b = g.lm_batch_contexts
        m = -(-(-(-n // g.rows_per_context)) // b) * b
        rng = np.random.default_rng([seed, 0x73616D70])
        ids = rng.choice(self.n_contexts, m, replace=m > self.n_contexts)
        tokens = self._tokens(ids).reshape(m // b, b, g.ctx_len)
        return self._sample(self.params, _put(tokens, self._chunks_sh), n)

    def summary_metrics(self, decoder: jax.Array) -> dict:
        """No ground truth to compare a trained decoder with."""
        return {}

    def describe(self) -> dict:
        """JSON-able summary (for run metadata and logs)."""
        g = self.geometry
        return {"batch_size": g.batch_size, "buffer_size": g.buffer_size, "blocks": g.blocks,
                "ctx_len": g.ctx_len, "drop_bos": bool(g.drop), "bos_id": self.bos_id,
                "lm_batch_contexts": g.lm_batch_contexts, "seed": self.seed,
                "shuffle_contexts": self.shuffle_contexts, "shuffle": self.shuffle,
                "dtype": self.dtype.name, "d_in": self.d_in, "n_contexts": self.n_contexts,
                "steps_per_harvest": g.steps_per_harvest,
                "lm_tokens_per_harvest": g.lm_tokens_per_harvest,
                "lm_overhead": g.lm_tokens_per_harvest / g.half - 1}


class FeedBatches:
    """`Prefetcher`-shaped (next/close) view of a feed for the training loop. No thread: the
    feed's work is async device dispatch already, and dispatching it from the loop's thread
    keeps refills (which donate the buffer) in order with the steps that read it."""

    def __init__(self, feed: OnTheFlyFeed, start: int, stop: int):
        self.feed, self.step, self.stop = feed, start, stop

    def next(self) -> jax.Array:
        if self.step >= self.stop:
            raise StopIteration
        out = self.feed.batch(self.step)
        self.step += 1
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- from a run config


def make_feed(cfg, mesh: Mesh) -> OnTheFlyFeed:
    """The feed named by cfg.data (source=lm): the LM at data.lm_path, the token dataset at
    data.tokens_path, hook site data.site. Errors name the data field (ConfigError)."""
    from saejax.config import ConfigError
    from saejax.lm import load_lm
    from saejax.text.tokens import TokenDataset

    d, t = cfg.data, cfg.train
    try:
        lm = load_lm(d.lm_path, dtype=jnp.dtype(getattr(d, "lm_dtype", "float32")))
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.lm_path={d.lm_path!r}: {e}") from e
    try:
        tokens = TokenDataset(d.tokens_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokens_path={d.tokens_path!r}: {e}") from e
    try:
        feed = OnTheFlyFeed.from_lm(
            lm, d.site, tokens, mesh, batch_size=t.batch_size, buffer_size=d.buffer_size,
            lm_batch_contexts=d.lm_batch_contexts, blocks=d.buffer_blocks,
            drop_bos=d.drop_bos, seed=d.seed, shuffle_contexts=d.shuffle_contexts)
    except ValueError as e:
        raise ConfigError(f"data.source=lm: {e}") from e
    if feed.d_in != cfg.sae.d_in:
        raise ConfigError(f"data.site={d.site!r} gives vectors of width {feed.d_in} but "
                          f"sae.d_in={cfg.sae.d_in}")
    return feed


__all__: Sequence[str] = ["FeedBatches", "Geometry", "OnTheFlyFeed",
                          "context_ids", "lm_param_shardings", "make_feed"]
