"""Per-feature statistics of an SAE over a token pass, streamed batch by batch on device.

One pass over the text keeps, for every feature:

- the `top_k` largest activations with their (context, position): each chunk's per-feature
  top-k (`lax.top_k` over f^T) is merged into the running [F, k] state by one more top-k over
  [F, k + k]. Activation 0 is not an example: slots still holding 0 are empty.
- `n_samples` firing examples drawn uniformly at random (activation samples across the range,
  not only the top): reservoir sampling by random priorities. Every firing (token, feature)
  gets a priority u ~ U[0, 1) and the `n_samples` largest priorities are kept with the same
  top-k merge, which is a uniform sample without replacement of the firing examples. The
  priority is a function of (seed, context, position, feature) only, so the sample does not
  depend on batching or chunking.
- firing count, activation sum (-> mean when firing), max activation, and a histogram of
  log10(activation) on fixed bins with under/overflow (`StreamOptions.hist_bin`).

Memory: the state is O(F * (3 top_k + 4 n_samples + bins)) on device (100k features with
20 + 20 examples and 32 bins: 70 MB). Per batch, tokens are encoded `chunk` at a time with
chunk * F <= `chunk_elements`, so the working set is a few [chunk, F] arrays (activations,
priorities, their transposes) whatever B * T and F are; nothing of size [tokens, F] is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saejax.hashmix import mix32
from saejax.lm.stream import site_batches


@dataclass(frozen=True)
class StreamOptions:
    """What the streaming pass keeps per feature."""

    top_k: int = 20
    """Top-activating examples kept per feature."""
    n_samples: int = 20
    """Uniformly sampled firing examples kept per feature (0 = none)."""
    seed: int = 0
    """Seed of the sampling priorities; the sample is a function of (seed, context, position,
    feature), so it is the same for any batch size or chunking."""
    hist_log10_min: float = -4.0
    """Lowest histogram edge, log10 of the activation. Activations are in the site's raw units:
    MLP activations of trained LMs are O(0.01-10), residual-stream SAEs of large models see
    activations up to O(100-1000), and ReLU/L1 features have a tail of tiny activations near 0
    that matters only as "fired at all". 1e-4..1e4 covers any feature's body; what falls outside
    goes to the under/overflow bins (and the exact maximum is kept separately)."""
    hist_log10_max: float = 4.0
    """Highest histogram edge, log10 of the activation."""
    hist_bins: int = 32
    """Bins between the two edges (32 over 8 decades: 0.25 decade, a factor 1.78, per bin)."""
    chunk_elements: int = 1 << 25
    """Tokens x features encoded at once: chunk = max(1, chunk_elements // F) tokens, bounding
    the [chunk, F] working set (2^25 float32 = 128 MB per array)."""

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {self.n_samples}")
        if self.hist_bins < 1 or not self.hist_log10_min < self.hist_log10_max:
            raise ValueError(f"histogram needs hist_bins >= 1 and hist_log10_min < hist_log10_max,"
                             f" got {self.hist_bins} bins over [{self.hist_log10_min}, "
                             f"{self.hist_log10_max}]")
        if self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {self.chunk_elements}")

    def hist_edges(self) -> np.ndarray:
        """[bins + 1] log10 edges. Bin i holds 10^edges[i] <= act < 10^edges[i + 1]."""
        return np.linspace(self.hist_log10_min, self.hist_log10_max, self.hist_bins + 1)

    def hist_bin(self, act):
        """Histogram column of activations > 0 (numpy or jax, elementwise): 0 = underflow
        (act < 10^edges[0]), 1 + i = bin i, bins + 1 = overflow (act >= 10^edges[-1])."""
        xp = jnp if isinstance(act, jax.Array) else np
        lo, nb = self.hist_log10_min, self.hist_bins
        z = (xp.log10(xp.maximum(act, 1e-30)) - lo) * (nb / (self.hist_log10_max - lo))
        return xp.clip(xp.floor(z).astype(xp.int32) + 1, 0, nb + 1)


class StreamState(NamedTuple):
    """Running per-feature state, on device. Slots are sorted best first."""

    top_act: jax.Array
    """[F, top_k] float32 largest activations; 0 = empty slot."""
    top_ctx: jax.Array
    """[F, top_k] int32 context ids."""
    top_pos: jax.Array
    """[F, top_k] int32 positions in the context."""
    smp_pri: jax.Array
    """[F, n_samples] float32 sampling priorities in [0, 1); -1 = empty slot."""
    smp_act: jax.Array
    """[F, n_samples] float32 activations of the sampled examples."""
    smp_ctx: jax.Array
    """[F, n_samples] int32."""
    smp_pos: jax.Array
    """[F, n_samples] int32."""
    n_fired: jax.Array
    """[F] int32 counted tokens with activation > 0 (int32: up to 2^31 tokens)."""
    act_sum: jax.Array
    """[F] float32 sum of activations."""
    max_act: jax.Array
    """[F] float32 largest activation (0 if never fired)."""
    hist: jax.Array
    """[F, bins + 2] int32 firings per log10 bin: [underflow, bins..., overflow]."""


def init_state(n_features: int, opts: StreamOptions) -> StreamState:
    F, k, s = n_features, opts.top_k, opts.n_samples
    zi = lambda n: jnp.zeros((F, n), jnp.int32)  # noqa: E731
    return StreamState(
        jnp.zeros((F, k), jnp.float32), zi(k), zi(k),
        jnp.full((F, s), -1.0, jnp.float32), jnp.zeros((F, s), jnp.float32), zi(s), zi(s),
        jnp.zeros(F, jnp.int32), jnp.zeros(F, jnp.float32), jnp.zeros(F, jnp.float32),
        zi(opts.hist_bins + 2))


def merge_topk(score: jax.Array, payload: Sequence[jax.Array], new_score: jax.Array,
               new_payload: Sequence[jax.Array], k: int) -> tuple[jax.Array, list[jax.Array]]:
    """Top-k by score over [F, k] running state and [F, m] candidates, payloads carried along.

    Ties keep the running state first (lax.top_k prefers lower indices), so earlier examples win.
    """
    s = jnp.concatenate([score, new_score], axis=1)
    best, idx = jax.lax.top_k(s, k)
    take = lambda a, b: jnp.take_along_axis(jnp.concatenate([a, b], 1), idx, 1)  # noqa: E731
    return best, [take(a, b) for a, b in zip(payload, new_payload)]


def priorities(key: jax.Array, ctx: jax.Array, pos: jax.Array, n_features: int) -> jax.Array:
    """[C, F] uniform [0, 1) sampling priorities of tokens (ctx [C], pos [C]) x features.

    Each token gets 32 random bits from a key folded from (ctx, pos) (independent of how tokens
    are batched); features are mixed in splitmix-style (bits ^ feature * golden ratio, then
    the murmur finalizer), about 15x cheaper than a threefry draw per (token, feature)."""
    bits = jax.vmap(lambda c, p: jax.random.bits(
        jax.random.fold_in(jax.random.fold_in(key, c), p), (), jnp.uint32))(ctx, pos)
    feat = jnp.arange(n_features, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
    h = mix32(bits[:, None] ^ feat[None, :])
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)  # 24 bits: exact in float32


def update(state: StreamState, f: jax.Array, ctx: jax.Array, pos: jax.Array,
           valid: jax.Array, key: jax.Array, opts: StreamOptions) -> StreamState:
    """Fold one chunk of feature activations into the state (pure; jit with opts static).

    f [C, F] activations (>= 0); ctx, pos [C] int32 where each token is; valid [C] bool tokens
    that count (padding and BOS are False); key: the sampling key.
    """
    C, F = f.shape
    f = jnp.where(valid[:, None], f.astype(jnp.float32), 0.0)
    fired = f > 0
    # Per-chunk candidates first (at most C of them), then one merge into the running state.
    k = state.top_act.shape[1]
    vals, idx = jax.lax.top_k(f.T, min(k, C))
    top_act, (top_ctx, top_pos) = merge_topk(
        state.top_act, (state.top_ctx, state.top_pos), vals, (ctx[idx], pos[idx]), k)

    s = state.smp_pri.shape[1]
    smp = state.smp_pri, (state.smp_act, state.smp_ctx, state.smp_pos)
    if s:
        pri = jnp.where(fired, priorities(key, ctx, pos, F), -1.0).T  # [F, C]
        pv, pidx = jax.lax.top_k(pri, min(s, C))
        smp = merge_topk(state.smp_pri, smp[1], pv,
                         (jnp.take_along_axis(f.T, pidx, 1), ctx[pidx], pos[pidx]), s)
    # Histogram as a segment sum over (feature, bin) ids: O(C * F), no [C, F, bins] one-hot.
    nb2 = state.hist.shape[1]
    ids = jnp.arange(F, dtype=jnp.int32) * nb2 + opts.hist_bin(f)
    hist = jax.ops.segment_sum(fired.astype(jnp.int32).reshape(-1), ids.reshape(-1),
                               num_segments=F * nb2).reshape(F, nb2)
    return StreamState(
        top_act, top_ctx, top_pos, smp[0], *smp[1],
        state.n_fired + fired.sum(0, dtype=jnp.int32), state.act_sum + f.sum(0),
        jnp.maximum(state.max_act, f.max(0)), state.hist + hist)


def chunk_tokens(n_tokens: int, n_features: int, chunk_elements: int) -> int:
    """Tokens per chunk so that [chunk, F] has at most chunk_elements entries (at least 1)."""
    return max(1, min(n_tokens, chunk_elements // n_features))


def scan_chunks(body: Callable, carry, arrays: Sequence[jax.Array], chunk: int):
    """lax.scan of body(carry, (start, *chunks)) over [chunk]-token slices of arrays [N, ...].

    Arrays are zero-padded to a whole number of chunks (pass a validity mask among them so the
    padding is ignored); start is the chunk's first token index. Returns the final carry."""
    n = arrays[0].shape[0]
    n_chunks = math.ceil(n / chunk)
    pad = n_chunks * chunk - n

    def split(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(n_chunks, chunk, *a.shape[1:])

    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    carry, _ = jax.lax.scan(lambda c, xs: (body(c, xs), None), carry,
                            (starts, *[split(a) for a in arrays]))
    return carry


def batch_step(encode: Callable, opts: StreamOptions) -> Callable:
    """Jitted (params, state, x [B, T, d], mask [B, T], ctx [B]) -> state for one batch
    (the state passed in is donated: use the returned one)."""
    key = jax.random.key(opts.seed)

    @partial(jax.jit, donate_argnums=1)  # the state is updated in place
    def step(params, state, x, mask, ctx):
        B, T, d = x.shape
        F = state.n_fired.shape[0]
        ctx_t = jnp.repeat(ctx.astype(jnp.int32), T)
        pos_t = jnp.tile(jnp.arange(T, dtype=jnp.int32), B)

        def body(st, chunk):
            _, xc, mc, cc, pc = chunk
            return update(st, encode(params, xc), cc, pc, mc, key, opts)

        return scan_chunks(body, state, (x.reshape(B * T, d), mask.reshape(-1), ctx_t, pos_t),
                           chunk_tokens(B * T, F, opts.chunk_elements))

    return step


def pad_batch(batch, site: str, rows: int) -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """(acts [rows, T, d], mask [rows, T], index [rows] int32) of a SiteBatch, a short last
    batch padded with masked rows so every batch has one shape (one compile)."""
    x, mask, index = batch.acts[site], batch.mask, batch.index.astype(np.int32)
    pad = rows - len(index)
    if pad > 0:
        x = jnp.pad(x, ((0, pad), (0, 0), (0, 0)))
        mask = np.pad(mask, ((0, pad), (0, 0)))
        index = np.pad(index, (0, pad))
    return x, mask, index


@dataclass(frozen=True)
class Example:
    """One activating example of one feature."""

    context: int
    pos: int
    act: float


@dataclass
class FeatureSummary:
    """The streamed state read back to host (numpy), plus what it was counted over."""

    state: StreamState
    """Every field as a numpy array (see StreamState)."""
    n_tokens: int
    """Counted positions (mask True) in the pass."""
    opts: StreamOptions

    @property
    def n_features(self) -> int:
        return int(self.state.n_fired.shape[0])

    @property
    def density(self) -> np.ndarray:
        """[F] fraction of counted tokens on which each feature fires."""
        return self.state.n_fired / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> np.ndarray:
        """[F] mean activation over the tokens where the feature fires (0 if it never does)."""
        return np.where(self.state.n_fired > 0,
                        self.state.act_sum / np.maximum(self.state.n_fired, 1), 0.0)

    def top(self, feature: int) -> list[Example]:
        """The feature's top examples, largest activation first (fewer than top_k if it fired
        fewer times)."""
        s = self.state
        return [Example(int(c), int(p), float(a))
                for a, c, p in zip(s.top_act[feature], s.top_ctx[feature], s.top_pos[feature])
                if a > 0]

    def samples(self, feature: int) -> list[Example]:
        """The feature's uniform sample of firing examples, largest activation first."""
        s = self.state
        out = [Example(int(c), int(p), float(a))
               for r, a, c, p in zip(s.smp_pri[feature], s.smp_act[feature],
                                     s.smp_ctx[feature], s.smp_pos[feature]) if r >= 0]
        return sorted(out, key=lambda e: -e.act)


def stream_features(sae, lm, tokens, contexts: Sequence[int], opts: StreamOptions, *,
                    batch_contexts: int = 32) -> FeatureSummary:
    """One pass of `contexts` of the TokenDataset `tokens` through `lm` and the TrainedSAE `sae`
    (at sae.site), returning every feature's statistics and examples (module docstring)."""
    if not sae.site:
        raise ValueError(f"SAE {sae.source or sae.name!r} does not record its hook site")
    if len(contexts) == 0:
        raise ValueError("no contexts to analyse (contexts selects an empty range)")
    state = init_state(sae.n_features, opts)
    step = batch_step(sae.encode, opts)
    n_tokens = 0
    for batch in site_batches(lm, tokens, [sae.site], contexts, batch_contexts=batch_contexts):
        x, mask, index = pad_batch(batch, sae.site, batch_contexts)
        if x.shape[-1] != sae.d_in:
            raise ValueError(f"site {sae.site} gives activations of width {x.shape[-1]}, but "
                             f"SAE {sae.name!r} has d_in {sae.d_in}")
        state = step(sae.params, state, x, mask, index)
        n_tokens += int(batch.mask.sum())
    return FeatureSummary(StreamState(*jax.device_get(state)), n_tokens, opts)
