"""GPT-NeoX / Pythia: parallel residual (optional), partial rotary (rotary_pct), untied head.

The fused query_key_value output is laid out per head as [q_h | k_h | v_h] (transformers views
it as [..., heads, 3 * d_head] and chunks the last axis), not as [all q | all k | all v].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saejax.lm.convert import Tensor, linear, linear_heads_in, names, rope_from_hf
from saejax.lm.model import LMConfig

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import PretrainedConfig

PREFIX = "gpt_neox."


def config_from_hf(hf: PretrainedConfig) -> LMConfig:
    d, h = hf.hidden_size, hf.num_attention_heads
    return LMConfig(
        model_type="gpt_neox",
        vocab_size=hf.vocab_size,
        d_model=d,
        n_layers=hf.num_hidden_layers,
        n_heads=h,
        n_kv_heads=h,
        d_head=d // h,
        d_mlp=hf.intermediate_size,
        act=hf.hidden_act,
        norm="layernorm",
        norm_eps=hf.layer_norm_eps,
        parallel_residual=hf.use_parallel_residual,
        rope=rope_from_hf(hf, d // h),
        qkv_bias=getattr(hf, "attention_bias", True),
        attn_out_bias=getattr(hf, "attention_bias", True),
        mlp_bias=True,
        tied_embeddings=getattr(hf, "tie_word_embeddings", False),
    )


def weight_map(cfg: LMConfig) -> dict[str, Tensor]:
    H, E = cfg.n_heads, cfg.d_head
    k = lambda name: names(PREFIX, name)  # noqa: E731
    w = {
        "embed": Tensor(k("embed_in.weight")),
        "ln_final.scale": Tensor(k("final_layer_norm.weight")),
        "ln_final.bias": Tensor(k("final_layer_norm.bias")),
    }
    if not cfg.tied_embeddings:  # Pythia checkpoints say embed_out; transformers 5 saves lm_head
        w["unembed"] = Tensor(("embed_out.weight", "lm_head.weight"), lambda a: a.T)
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"layers.{i}."
        for j, q in enumerate("qkv"):
            w[b + f"attn.w{q}"] = Tensor(
                k(h + "attention.query_key_value.weight"),
                lambda a, j=j: linear(H, 3, E)(a)[:, :, j],
            )
            if cfg.qkv_bias:
                w[b + f"attn.b{q}"] = Tensor(
                    k(h + "attention.query_key_value.bias"), lambda a, j=j: a.reshape(H, 3, E)[:, j]
                )
        w[b + "attn.wo"] = Tensor(k(h + "attention.dense.weight"), linear_heads_in(H, E))
        if cfg.attn_out_bias:
            w[b + "attn.bo"] = Tensor(k(h + "attention.dense.bias"))
        for ours, theirs in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            w[b + ours + ".scale"] = Tensor(k(h + theirs + ".weight"))
            w[b + ours + ".bias"] = Tensor(k(h + theirs + ".bias"))
        w[b + "mlp.w_in"] = Tensor(k(h + "mlp.dense_h_to_4h.weight"), linear())
        w[b + "mlp.b_in"] = Tensor(k(h + "mlp.dense_h_to_4h.bias"))
        w[b + "mlp.w_out"] = Tensor(k(h + "mlp.dense_4h_to_h.weight"), linear())
        w[b + "mlp.b_out"] = Tensor(k(h + "mlp.dense_4h_to_h.bias"))
    return w
