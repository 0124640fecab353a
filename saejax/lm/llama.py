"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3 and Gemma 2.

All share RMSNorm, rotary, grouped-query attention and a gated MLP under the same checkpoint
names (`model.layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, ...). The differences:
- Qwen2: bias on q/k/v (not o). Qwen3: no biases, RMSNorm on q and k per head.
- Mistral: one sliding window for every layer; Qwen2/3 and Gemma 2: per-layer `layer_types`.
- Gemma 2: RMSNorm scale is (1 + w), sandwich norms around attention and MLP (its
  `post_attention_layernorm` is the norm *after* attention, not the pre-MLP norm as in Llama),
  embeddings times sqrt(d_model), query_pre_attn_scalar, attention and final logit softcaps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saejax.lm.convert import Tensor, linear, linear_heads_in, names, rope_from_hf, sliding_windows
from saejax.lm.model import LMConfig

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import PretrainedConfig

PREFIX = "model."
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


def config_from_hf(hf: PretrainedConfig) -> LMConfig:
    t = hf.model_type
    d, h = hf.hidden_size, hf.num_attention_heads
    e = getattr(hf, "head_dim", None) or d // h
    bias = bool(getattr(hf, "attention_bias", False))
    gemma = t == "gemma2"
    return LMConfig(
        model_type=t,
        vocab_size=hf.vocab_size,
        d_model=d,
        n_layers=hf.num_hidden_layers,
        n_heads=h,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or h,
        d_head=e,
        d_mlp=hf.intermediate_size,
        act=hf.hidden_activation if gemma else hf.hidden_act,
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=hf.rms_norm_eps,
        norm_offset=gemma,
        sandwich_norm=gemma,
        qk_norm=t == "qwen3",
        rope=rope_from_hf(hf, e),
        qkv_bias=bias or t == "qwen2",
        attn_out_bias=bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tied_embeddings=bool(getattr(hf, "tie_word_embeddings", gemma)),
        embed_scale=d**0.5 if gemma else None,
        attn_scale=hf.query_pre_attn_scalar**-0.5 if gemma else None,
        attn_softcap=getattr(hf, "attn_logit_softcapping", None) if gemma else None,
        final_softcap=getattr(hf, "final_logit_softcapping", None) if gemma else None,
        sliding_windows=sliding_windows(hf),
    )


def weight_map(cfg: LMConfig) -> dict[str, Tensor]:
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    k = lambda name: names(PREFIX, name)  # noqa: E731
    w = {"embed": Tensor(k("embed_tokens.weight")), "ln_final.scale": Tensor(k("norm.weight"))}
    if not cfg.tied_embeddings:
        w["unembed"] = Tensor(("lm_head.weight",), linear())
    norms = (
        {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm",
         "ln2": "pre_feedforward_layernorm", "ln2_post": "post_feedforward_layernorm"}
        if cfg.sandwich_norm
        else {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
    )  # fmt: skip
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"layers.{i}."
        for ours, theirs in norms.items():
            w[b + ours + ".scale"] = Tensor(k(h + theirs + ".weight"))
        for q, heads in (("q", H), ("k", K), ("v", K)):
            w[b + f"attn.w{q}"] = Tensor(k(h + f"self_attn.{q}_proj.weight"), linear(heads, E))
            if cfg.qkv_bias:
                w[b + f"attn.b{q}"] = Tensor(
                    k(h + f"self_attn.{q}_proj.bias"), lambda a, n=heads: a.reshape(n, E)
                )
        w[b + "attn.wo"] = Tensor(k(h + "self_attn.o_proj.weight"), linear_heads_in(H, E))
        if cfg.attn_out_bias:
            w[b + "attn.bo"] = Tensor(k(h + "self_attn.o_proj.bias"))
        if cfg.qk_norm:
            w[b + "attn.q_norm.scale"] = Tensor(k(h + "self_attn.q_norm.weight"))
            w[b + "attn.k_norm.scale"] = Tensor(k(h + "self_attn.k_norm.weight"))
        for ours, theirs in (("in", "up_proj"), ("gate", "gate_proj"), ("out", "down_proj")):
            w[b + f"mlp.w_{ours}"] = Tensor(k(h + f"mlp.{theirs}.weight"), linear())
            if cfg.mlp_bias:
                w[b + f"mlp.b_{ours}"] = Tensor(k(h + f"mlp.{theirs}.bias"))
    return w
