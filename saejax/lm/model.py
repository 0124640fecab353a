"""One decoder-only transformer in Flax NNX that covers GPT-2, GPT-NeoX, Llama-style and Gemma 2.

The families differ only in switches of `LMConfig` (norm kind, learned vs rotary positions, gated
MLP, parallel residual, biases, sandwich norms, softcaps); one implementation keeps the hook sites
(`saejax.lm.hooks`) at the same places for every family. Family modules (`gpt2.py`, `neox.py`,
`llama.py`) turn a Hugging Face config into an `LMConfig` and map checkpoint tensors onto it.

Parameters carry logical axis names (`vocab`, `d_model`, `heads`, `kv_heads`, `d_head`, `d_mlp`,
`n_ctx`) as `out_sharding` metadata; `saejax.sharding` maps names to mesh axes. Computation runs
in the parameter dtype; norms, attention scores and softmax run in float32, as in transformers.

Use under jit with split/merge (the module is a plain pytree of arrays plus a static graphdef):

    graphdef, state = nnx.split(lm)
    @jax.jit
    def acts(state, tokens):
        return nnx.merge(graphdef, state).run_with_cache(tokens, ["blocks.0.mlp.hook_post"])[1]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saejax.lm.hooks import HookRun, Splice, StopForward, hook_names

F32 = jnp.float32

# Hugging Face activation names -> JAX. The tanh-approximate GELUs are one formula under four names.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_python_tanh": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "tanh": jnp.tanh,
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding, rotate-half convention, applied to the first `dim` dims of each head."""

    dim: int
    theta: float = 10000.0
    scaling: str = "default"  # "default" | "linear" | "llama3" (transformers' rope_type)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def inv_freq(self) -> np.ndarray:
        # float32 throughout, as transformers computes it, so angles agree to the last bits.
        exps = np.arange(0, self.dim, 2, dtype=np.float32) / np.float32(self.dim)
        inv = (np.float32(1.0) / np.power(np.float32(self.theta), exps)).astype(np.float32)
        if self.scaling == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.scaling == "llama3":
            low_wl = self.original_max_positions / self.low_freq_factor
            high_wl = self.original_max_positions / self.high_freq_factor
            wavelen = np.float32(2 * math.pi) / inv
            scaled = np.where(wavelen > low_wl, inv / self.factor, inv)
            smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wl) & (wavelen <= low_wl)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv


@dataclass(frozen=True)
class LMConfig:
    """Architecture switches; every field is static (hashable) so it lives in the graphdef."""

    model_type: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_kv_heads: int  # == n_heads without grouped-query attention
    act: str = "gelu_new"
    gated_mlp: bool = False  # SwiGLU / GeGLU: act(x W_gate) * (x W_in)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    norm_offset: bool = False  # Gemma stores w and scales by (1 + w)
    sandwich_norm: bool = False  # Gemma 2: extra norms on attention and MLP outputs
    qk_norm: bool = False  # Qwen3: RMSNorm over d_head on q and k before rotary
    parallel_residual: bool = False  # GPT-NeoX: attn and MLP both read resid_pre
    n_ctx: int = 0  # learned absolute position embeddings (GPT-2); 0 = none
    rope: RopeConfig | None = None
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    tied_embeddings: bool = False
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(d_model)
    attn_scale: float | None = None  # None = d_head ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; () = full causal everywhere

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.act!r} not supported; supported: {sorted(ACTIVATIONS)}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}"
            )

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


class _Init:
    """Creates parameters with logical axis names (random init for fresh models; `load_lm`
    builds the module abstractly with `nnx.eval_shape` and fills in checkpoint tensors)."""

    def __init__(self, rngs: nnx.Rngs, dtype: jnp.dtype, std: float = 0.02):
        self.rngs, self.dtype, self.std = rngs, dtype, std

    def normal(self, shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
        w = self.std * jax.random.normal(self.rngs.params(), shape, F32)
        return nnx.Param(w.astype(self.dtype), out_sharding=axes, eager_sharding=False)

    def const(self, value: float, shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
        return nnx.Param(
            jnp.full(shape, value, self.dtype), out_sharding=axes, eager_sharding=False
        )


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last axis, computed in float32."""

    def __init__(self, d: int, cfg: LMConfig, init: _Init, axis_name: str = "d_model"):
        self.rms = cfg.norm == "rmsnorm"
        self.eps = cfg.norm_eps
        self.offset = cfg.norm_offset
        self.scale = init.const(0.0 if cfg.norm_offset else 1.0, (d,), (axis_name,))
        self.bias = None if self.rms else init.const(0.0, (d,), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(F32)
        if not self.rms:
            h = h - h.mean(-1, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(F32)
        h = h * (1.0 + scale if self.offset else scale)
        if self.bias is not None:
            h = h + self.bias[...].astype(F32)
        return h.astype(x.dtype)


def rotary_tables(rope: RopeConfig, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [T, rope.dim] (frequencies repeated for the two halves)."""
    # Computed from positions on device, so long contexts do not bake [T, dim] tables into HLO.
    freqs = jnp.arange(seq_len, dtype=F32)[:, None] * jnp.asarray(rope.inv_freq())[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, d_head]; rotates the first cos.shape[-1] dims (partial rotary), rest pass."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    c, s = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
    return jnp.concatenate([x_rot * c + rotated * s, x_pass], axis=-1)


class Attention(nnx.Module):
    """Causal multi-head attention with grouped-query heads, rotary, optional softcap."""

    def __init__(self, cfg: LMConfig, init: _Init):
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.wq = init.normal((D, H, E), ("d_model", "heads", "d_head"))
        self.wk = init.normal((D, K, E), ("d_model", "kv_heads", "d_head"))
        self.wv = init.normal((D, K, E), ("d_model", "kv_heads", "d_head"))
        self.wo = init.normal((H, E, D), ("heads", "d_head", "d_model"))
        self.bq = init.const(0.0, (H, E), ("heads", "d_head")) if cfg.qkv_bias else None
        self.bk = init.const(0.0, (K, E), ("kv_heads", "d_head")) if cfg.qkv_bias else None
        self.bv = init.const(0.0, (K, E), ("kv_heads", "d_head")) if cfg.qkv_bias else None
        self.bo = init.const(0.0, (D,), ("d_model",)) if cfg.attn_out_bias else None
        self.q_norm = Norm(E, cfg, init, "d_head") if cfg.qk_norm else None
        self.k_norm = Norm(E, cfg, init, "d_head") if cfg.qk_norm else None
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else E**-0.5
        self.softcap = cfg.attn_softcap

    @staticmethod
    def _proj(x: jax.Array, w: nnx.Param, b: nnx.Param | None) -> jax.Array:
        y = jnp.einsum("btd,dhe->bthe", x, w[...])
        return y if b is None else y + b[...]

    def __call__(
        self, x: jax.Array, mask: jax.Array, rotary: tuple[jax.Array, jax.Array] | None
    ) -> jax.Array:
        q, k, v = (
            self._proj(x, w, b)
            for w, b in ((self.wq, self.bq), (self.wk, self.bk), (self.wv, self.bv))
        )
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        B, T, H, E = q.shape
        K = k.shape[2]
        # Query head h uses kv head h // (H // K), as transformers' repeat_kv.
        q = q.reshape(B, T, K, H // K, E)
        s = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=F32) * self.scale
        if self.softcap is not None:
            s = self.softcap * jnp.tanh(s / self.softcap)
        s = jnp.where(mask[:, None, None], s, jnp.finfo(F32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("bkgts,bske->btkge", p, v).reshape(B, T, H, E)
        out = jnp.einsum("bthe,hed->btd", o, self.wo[...])
        return out if self.bo is None else out + self.bo[...]


class MLP(nnx.Module):
    """act(x W_in + b_in) W_out + b_out, or the gated form act(x W_gate) * (x W_in)."""

    def __init__(self, cfg: LMConfig, init: _Init):
        D, M = cfg.d_model, cfg.d_mlp
        self.w_in = init.normal((D, M), ("d_model", "d_mlp"))
        self.w_gate = init.normal((D, M), ("d_model", "d_mlp")) if cfg.gated_mlp else None
        self.w_out = init.normal((M, D), ("d_mlp", "d_model"))
        self.b_in = init.const(0.0, (M,), ("d_mlp",)) if cfg.mlp_bias else None
        self.b_gate = init.const(0.0, (M,), ("d_mlp",)) if cfg.mlp_bias and cfg.gated_mlp else None
        self.b_out = init.const(0.0, (D,), ("d_model",)) if cfg.mlp_bias else None
        self.act = cfg.act

    def __call__(self, x: jax.Array, hook: Callable[[str, jax.Array], jax.Array], prefix: str):
        act = ACTIVATIONS[self.act]
        h = x @ self.w_in[...]
        if self.b_in is not None:
            h = h + self.b_in[...]
        if self.w_gate is not None:
            g = x @ self.w_gate[...]
            if self.b_gate is not None:
                g = g + self.b_gate[...]
            h = act(g) * h
        else:
            h = act(h)
        h = hook(prefix + "mlp.hook_post", h)
        out = h @ self.w_out[...]
        return out if self.b_out is None else out + self.b_out[...]


class Block(nnx.Module):
    """Pre-norm block; the hook sites sit where `saejax.lm.hooks` documents them."""

    def __init__(self, cfg: LMConfig, init: _Init):
        self.ln1 = Norm(cfg.d_model, cfg, init)
        self.attn = Attention(cfg, init)
        self.ln2 = Norm(cfg.d_model, cfg, init)
        self.mlp = MLP(cfg, init)
        self.ln1_post = Norm(cfg.d_model, cfg, init) if cfg.sandwich_norm else None
        self.ln2_post = Norm(cfg.d_model, cfg, init) if cfg.sandwich_norm else None
        self.parallel = cfg.parallel_residual

    def __call__(
        self,
        x: jax.Array,
        i: int,
        hook: HookRun,
        mask: jax.Array,
        rotary: tuple[jax.Array, jax.Array] | None,
    ) -> jax.Array:
        p = f"blocks.{i}."
        x = hook(p + "hook_resid_pre", x)
        a = self.attn(self.ln1(x), mask, rotary)
        if self.ln1_post is not None:
            a = self.ln1_post(a)
        a = hook(p + "hook_attn_out", a)
        if not self.parallel:
            x = hook(p + "hook_resid_mid", x + a)
        m = self.mlp(self.ln2(x), hook, p)  # parallel: x is still resid_pre here
        if self.ln2_post is not None:
            m = self.ln2_post(m)
        m = hook(p + "hook_mlp_out", m)
        x = x + a + m if self.parallel else x + m
        return hook(p + "hook_resid_post", x)


class LM(nnx.Module):
    """A decoder-only LM with hook sites. tokens [B, T] int -> logits [B, T, vocab]."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = F32):
        init = _Init(rngs, dtype)
        self.cfg = cfg
        self.embed = init.normal((cfg.vocab_size, cfg.d_model), ("vocab", "d_model"))
        self.pos_embed = (
            init.normal((cfg.n_ctx, cfg.d_model), ("n_ctx", "d_model")) if cfg.n_ctx else None
        )
        self.blocks = nnx.List([Block(cfg, init) for _ in range(cfg.n_layers)])
        self.ln_final = Norm(cfg.d_model, cfg, init)
        self.unembed = (
            None
            if cfg.tied_embeddings
            else init.normal((cfg.d_model, cfg.vocab_size), ("d_model", "vocab"))
        )

    def hook_names(self) -> list[str]:
        return hook_names(self.cfg.n_layers, self.cfg.parallel_residual)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.run(tokens, attention_mask=attention_mask)[0]

    def run(
        self,
        tokens: jax.Array,
        *,
        cache: Iterable[str] = (),
        splices: Mapping[str, Splice] | None = None,
        logits: bool = True,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
        """The general entry point: splice `splices`, record `cache`, optionally compute logits.

        With logits=False the forward stops right after the last cached site. attention_mask
        [B, T] (1 = real token) masks keys only; positions stay 0..T-1, as transformers does
        without explicit position_ids.
        """
        hook = HookRun(self.hook_names(), cache, splices, need_logits=logits)
        try:
            hook.check_start()
            out = self._forward(tokens, attention_mask, hook)
        except StopForward:
            out = None
        return out, hook.cache

    def run_with_cache(
        self,
        tokens: jax.Array,
        sites: Iterable[str],
        *,
        logits: bool = False,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
        """(logits or None, {site: activation [B, T, d]}); stops early unless logits=True."""
        return self.run(tokens, cache=sites, logits=logits, attention_mask=attention_mask)

    def _forward(
        self, tokens: jax.Array, attention_mask: jax.Array | None, hook: HookRun
    ) -> jax.Array:
        cfg = self.cfg
        T = tokens.shape[1]
        x = jnp.take(self.embed[...], tokens, axis=0)
        if cfg.embed_scale is not None:
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        if self.pos_embed is not None:
            if T > cfg.n_ctx:
                raise ValueError(f"sequence length {T} exceeds the model's {cfg.n_ctx} positions")
            x = x + self.pos_embed[...][:T]
        rotary = rotary_tables(cfg.rope, T) if cfg.rope is not None else None
        masks: dict[int | None, jax.Array] = {}
        for i, block in enumerate(self.blocks):
            w = cfg.window(i)
            if w not in masks:
                masks[w] = _attention_mask(T, w, attention_mask)
            x = block(x, i, hook, masks[w], rotary)
        x = self.ln_final(x)
        w_u = self.embed[...].T if self.unembed is None else self.unembed[...]
        out = x @ w_u
        if cfg.final_softcap is not None:
            cap = cfg.final_softcap
            out = (cap * jnp.tanh(out.astype(F32) / cap)).astype(out.dtype)
        return out


def _attention_mask(T: int, window: int | None, key_mask: jax.Array | None) -> jax.Array:
    """[B or 1, T, S] bool: causal, within the sliding window (q - k < window), key not padding."""
    q = jnp.arange(T)[:, None]
    k = jnp.arange(T)[None, :]
    m = k <= q
    if window is not None:
        m = m & (q - k < window)
    m = m[None]
    if key_mask is not None:
        m = m & key_mask.astype(bool)[:, None, :]
    return m


def init_lm(cfg: LMConfig, seed: int = 0, dtype: jnp.dtype = F32) -> LM:
    """A randomly initialised LM, created inside one jit (eager init compiles per parameter)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(seed), dtype=dtype)))
    state = jax.jit(lambda: nnx.split(LM(cfg, rngs=nnx.Rngs(seed), dtype=dtype))[1])()
    return nnx.merge(graphdef, state)


def cache_fn(lm: LM, sites: Iterable[str], *, logits: bool = False):
    """(jitted fn(state, tokens, attention_mask=None) -> (logits|None, cache), state).

    The activation-harvesting entry point: split once, then call fn with fresh tokens.
    """
    graphdef, state = nnx.split(lm)
    sites = tuple(sites)

    @jax.jit
    def fn(state, tokens, attention_mask=None):
        model = nnx.merge(graphdef, state)
        return model.run_with_cache(tokens, sites, logits=logits, attention_mask=attention_mask)

    return fn, state
