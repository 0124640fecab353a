"""saejax LMs against transformers' PyTorch models: logits, hook sites, splices, loading.

Each case builds a tiny random model with transformers itself, saves it as safetensors and loads
it with saejax. Weights are re-drawn at scale ~0.25 (not transformers' 0.02 init) so attention
patterns are far from uniform and a wrong rotary / mask / head layout shows up in the logits.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from saejax.lm import MissingTensorError, load_lm  # noqa: E402

V, T, TOL = 96, 12, 1e-4
SMALL = dict(
    vocab_size=V, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64
)
GQA = dict(SMALL, num_key_value_heads=2)


def _gpt2(**kw):
    cfg = dict(vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_positions=32, n_inner=64)
    return tf.GPT2LMHeadModel(tf.GPT2Config(**cfg, **kw, bos_token_id=0, eos_token_id=0))


# name -> (builder, family). Families pick where the torch hooks go (see HOOK_MODULES).
CASES = {
    "gpt2_relu": (lambda: _gpt2(activation_function="relu"), "gpt2"),
    "gpt2_gelu_new": (lambda: _gpt2(activation_function="gelu_new"), "gpt2"),
    "neox_parallel_partial_rotary": (
        lambda: tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(**SMALL, rotary_pct=0.25, use_parallel_residual=True)
        ),
        "neox",
    ),
    "neox_sequential": (
        lambda: tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(
                **SMALL, rotary_pct=0.5, use_parallel_residual=False, hidden_act="gelu"
            )
        ),
        "neox",
    ),
    "llama_gqa": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**GQA, rope_theta=500000.0)), "llama"),
    "llama_tied_bias_llama3rope": (
        lambda: tf.LlamaForCausalLM(
            tf.LlamaConfig(
                **GQA,
                tie_word_embeddings=True,
                attention_bias=True,
                mlp_bias=True,
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=500000.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=256,
                ),
            )
        ),
        "llama",
    ),  # fmt: skip
    "qwen2_bias_tied": (
        lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**GQA, tie_word_embeddings=True)),
        "llama",
    ),
    "qwen3_qk_norm": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**GQA, head_dim=16)), "llama"),
    "mistral_sliding_window": (
        lambda: tf.MistralForCausalLM(tf.MistralConfig(**GQA, sliding_window=5)),
        "llama",
    ),
    "gemma2": (
        lambda: tf.Gemma2ForCausalLM(
            tf.Gemma2Config(**GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=5)
        ),
        "gemma2",
    ),
}

# family -> (layer list, module whose output is attn_out, ... mlp_out, MLP output projection)
HOOK_MODULES = {
    "gpt2": ("transformer.h", "attn", "mlp", "mlp.c_proj"),
    "neox": ("gpt_neox.layers", "attention", "mlp", "mlp.dense_4h_to_h"),
    "llama": ("model.layers", "self_attn", "mlp", "mlp.down_proj"),
    "gemma2": (
        "model.layers",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        "mlp.down_proj",
    ),
}


def _randomize(model) -> None:
    """Scale ~0.25 weights (norm scales around 1) so the forward is far from trivial."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = p.ndim == 1 and ("norm" in name or ".ln_" in name)
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.25 * noise)


def _build(name: str, tmp_path_factory):
    torch.manual_seed(0)
    model = CASES[name][0]()
    model.config._attn_implementation = "eager"
    _randomize(model)
    model.eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return model, load_lm(path), path


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model, lm, _ = _build(request.param, tmp_path_factory)
    return request.param, model, lm


def _tokens(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, V, (batch, T))


def _torch_forward(model, tokens, **kw):
    with torch.no_grad():
        return model(torch.tensor(tokens), **kw)


def _assert_close(ours, theirs, what: str) -> None:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape, what
    err = np.abs(ours - theirs).max()
    assert err <= TOL, f"{what}: max abs err {err:.3g}"


def test_logits_match_transformers(case):
    name, model, lm = case
    tokens = _tokens()
    theirs = _torch_forward(model, tokens).logits.numpy()
    assert theirs.std() > 0.5, "test model too close to trivial to catch layout errors"
    _assert_close(lm(jnp.asarray(tokens)), theirs, f"{name} logits")


def test_hook_sites_match_transformers(case):
    name, model, lm = case
    layers, attn_mod, mlp_mod, proj_mod = HOOK_MODULES[CASES[name][1]]
    got: dict[str, np.ndarray] = {}
    handles = []
    for i, layer in enumerate(model.get_submodule(layers)):

        def save(key):
            return lambda _m, _inp, out: got.__setitem__(
                key, (out[0] if isinstance(out, tuple) else out).numpy()
            )

        handles += [
            layer.register_forward_hook(save(f"blocks.{i}.hook_resid_post")),
            layer.get_submodule(attn_mod).register_forward_hook(save(f"blocks.{i}.hook_attn_out")),
            layer.get_submodule(mlp_mod).register_forward_hook(save(f"blocks.{i}.hook_mlp_out")),
            layer.get_submodule(proj_mod).register_forward_pre_hook(
                lambda _m, inp, key=f"blocks.{i}.mlp.hook_post": got.__setitem__(
                    key, inp[0].numpy()
                )
            ),
        ]
    tokens = _tokens()
    hidden = _torch_forward(model, tokens, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    n = model.config.num_hidden_layers
    for i in range(n):  # hidden_states[i] is the input of block i (the last one is final-normed)
        got[f"blocks.{i}.hook_resid_pre"] = hidden[i].numpy()
    assert set(got) <= set(lm.hook_names())
    _, ours = lm.run_with_cache(jnp.asarray(tokens), list(got))
    for site, value in got.items():
        _assert_close(ours[site], value, f"{name} {site}")


def test_zero_mlp_out_splice_matches_zeroed_projection(case):
    name, model, lm = case
    tokens = _tokens()
    proj = model.get_submodule(HOOK_MODULES[CASES[name][1]][0])[0].get_submodule(
        HOOK_MODULES[CASES[name][1]][3]
    )
    saved = {k: v.clone() for k, v in proj.state_dict().items()}
    with torch.no_grad():
        for p in proj.parameters():
            p.zero_()
    try:
        theirs = _torch_forward(model, tokens).logits.numpy()
    finally:
        proj.load_state_dict(saved)
    ours = lm.run(jnp.asarray(tokens), splices={"blocks.0.hook_mlp_out": jnp.zeros_like})[0]
    _assert_close(ours, theirs, f"{name} logits with block 0's MLP removed")
    same = lm.run(jnp.asarray(tokens), splices={s: lambda x: x for s in lm.hook_names()})[0]
    np.testing.assert_array_equal(np.asarray(same), np.asarray(lm(jnp.asarray(tokens))))


@pytest.mark.parametrize("name", ["gpt2_relu", "llama_gqa"])
def test_padding_mask_matches_transformers(name, tmp_path_factory):
    model, lm, _ = _build(name, tmp_path_factory)
    tokens = _tokens()
    mask = np.ones_like(tokens)
    mask[0, :4] = 0  # left padding in row 0
    theirs = _torch_forward(model, tokens, attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(lm(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    _assert_close(ours[real], theirs[real], f"{name} logits at unpadded positions")


def test_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**GQA)).eval()
    _randomize(model)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    tokens = _tokens()
    _assert_close(
        load_lm(tmp_path)(jnp.asarray(tokens)),
        _torch_forward(model, tokens).logits,
        "sharded logits",
    )


def test_bfloat16_checkpoint_and_dtype(tmp_path):
    torch.manual_seed(0)
    model = _gpt2(activation_function="gelu_new").eval()
    _randomize(model)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    lm = load_lm(tmp_path, dtype=jnp.bfloat16)
    assert lm.embed[...].dtype == jnp.bfloat16
    ref = _torch_forward(model.float(), _tokens()).logits.numpy()
    out = np.asarray(load_lm(tmp_path)(jnp.asarray(_tokens())))  # bf16 weights, float32 compute
    _assert_close(out, ref, "bf16-stored weights computed in float32")
    assert np.abs(np.asarray(lm(jnp.asarray(_tokens())), np.float32) - ref).max() < 0.5


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    _gpt2(activation_function="relu").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingTensorError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_lm(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="supported.*gpt2.*llama"):
        load_lm(tmp_path)
