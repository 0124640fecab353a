"""GPT-2 (and the Towards Monosemanticity one-layer ReLU model, which is a GPT2Config).

GPT-2 uses transformers' Conv1D, whose weight is already [in, out]: no transpose, only splitting
the fused c_attn into q, k, v and heads. Both directions: `config_from_hf` / `config_to_hf`, and
one `weight_map` that `load_lm` reads through and `saejax.lm.save.save_hf` writes through.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from saejax.lm.convert import Tensor, names, reshape
from saejax.lm.model import LMConfig

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import GPT2Config, PretrainedConfig

PREFIX = "transformer."


def config_from_hf(hf: PretrainedConfig) -> LMConfig:
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        raise NotImplementedError("GPT-2 scale_attn_by_inverse_layer_idx=True is not supported")
    d, h = hf.n_embd, hf.n_head
    return LMConfig(
        model_type="gpt2",
        vocab_size=hf.vocab_size,
        d_model=d,
        n_layers=hf.n_layer,
        n_heads=h,
        n_kv_heads=h,
        d_head=d // h,
        d_mlp=hf.n_inner if hf.n_inner is not None else 4 * d,
        act=hf.activation_function,
        norm="layernorm",
        norm_eps=hf.layer_norm_epsilon,
        n_ctx=hf.n_positions,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tied_embeddings=getattr(hf, "tie_word_embeddings", True),
        attn_scale=None if hf.scale_attn_weights else 1.0,
    )


def config_to_hf(cfg: LMConfig, **extra: Any) -> GPT2Config:
    """The transformers GPT2Config of `cfg` (the inverse of `config_from_hf`); `extra` sets other
    GPT2Config fields (bos_token_id, eos_token_id, ...). Dropout is 0: saejax trains without it,
    and a config that reloads as a different model in train mode would misdescribe it. Raises
    ValueError for an LMConfig that GPT-2 cannot express (rotary, RMSNorm, no biases, ...)."""
    from transformers import GPT2Config

    hf = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_mlp,
        activation_function=cfg.act,
        layer_norm_epsilon=cfg.norm_eps,
        scale_attn_weights=cfg.attn_scale is None,
        tie_word_embeddings=cfg.tied_embeddings,
        # GPT2Config's bos/eos default to 50256, GPT-2's own vocabulary: not ours unless given.
        **{"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
           "bos_token_id": None, "eos_token_id": None, **extra},
    )
    hf.architectures = ["GPT2LMHeadModel"]
    back = config_from_hf(hf)
    if back != cfg:
        diff = {
            f.name: (getattr(cfg, f.name), getattr(back, f.name))
            for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(back, f.name)
        }
        raise ValueError(f"this LMConfig is not a GPT-2 model; (ours, GPT-2's) differ: {diff}")
    return hf


def weight_map(cfg: LMConfig) -> dict[str, Tensor]:
    D, H, E = cfg.d_model, cfg.n_heads, cfg.d_head
    k = lambda name: names(PREFIX, name)  # noqa: E731
    w = {
        "embed": Tensor(k("wte.weight")),
        "pos_embed": Tensor(k("wpe.weight")),
        "ln_final.scale": Tensor(k("ln_f.weight")),
        "ln_final.bias": Tensor(k("ln_f.bias")),
    }
    if not cfg.tied_embeddings:
        w["unembed"] = Tensor(("lm_head.weight",), lambda a: a.T, inv=lambda a: a.T)
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"h.{i}."
        for j, q in enumerate("qkv"):  # c_attn.weight is [D, 3D] = [q | k | v]
            sl = slice(j * D, (j + 1) * D)
            w[b + f"attn.w{q}"] = Tensor(
                k(h + "attn.c_attn.weight"),
                lambda a, sl=sl: a[:, sl].reshape(D, H, E),
                inv=reshape(D, H * E), part=j, axis=1,
            )  # fmt: skip
            w[b + f"attn.b{q}"] = Tensor(
                k(h + "attn.c_attn.bias"),
                lambda a, sl=sl: a[sl].reshape(H, E),
                inv=reshape(H * E), part=j, axis=0,
            )  # fmt: skip
        w[b + "attn.wo"] = Tensor(
            k(h + "attn.c_proj.weight"), reshape(H, E, D), inv=reshape(H * E, D)
        )
        w[b + "attn.bo"] = Tensor(k(h + "attn.c_proj.bias"))
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            w[b + ours + ".scale"] = Tensor(k(h + theirs + ".weight"))
            w[b + ours + ".bias"] = Tensor(k(h + theirs + ".bias"))
        w[b + "mlp.w_in"] = Tensor(k(h + "mlp.c_fc.weight"))
        w[b + "mlp.b_in"] = Tensor(k(h + "mlp.c_fc.bias"))
        w[b + "mlp.w_out"] = Tensor(k(h + "mlp.c_proj.weight"))
        w[b + "mlp.b_out"] = Tensor(k(h + "mlp.c_proj.bias"))
    return w
