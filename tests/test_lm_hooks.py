"""Hook-site behaviour of saejax LMs on small random models (no torch, no checkpoints)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saejax.lm import (
    LM,
    LMConfig,
    RopeConfig,
    cache_fn,
    hook_names,
    init_lm,
    lm_config,
    load_lm,
)
from saejax.lm.load import resolve_model_dir

CFG = LMConfig(
    model_type="test", vocab_size=50, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, d_head=4,
    d_mlp=32, act="silu", gated_mlp=True, norm="rmsnorm", rope=RopeConfig(dim=4),
)  # fmt: skip
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 10)))


@functools.cache
def _lm_cached(overrides: tuple) -> LM:
    """Random weights drawn with numpy into an abstract module: no XLA compile of an init
    function (compiling the RNG calls costs seconds on CPU). Scale 0.3, not the 0.02 init, so
    a token change visibly moves every later activation."""
    cfg = dataclasses.replace(CFG, **dict(overrides))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    flat = [
        (
            path,
            v.replace(
                value=jnp.asarray(0.3 * rng.standard_normal(v.get_value().shape), jnp.float32)
            ),
        )
        for path, v in nnx.to_flat_state(abstract)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _lm(**overrides) -> LM:
    return _lm_cached(tuple(sorted(overrides.items())))


def _count_dots(jaxpr) -> int:
    """dot_general ops in a jaxpr, including those inside nested jit calls (einsum)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for v in eqn.params.values():
            if hasattr(v, "eqns"):
                n += _count_dots(v)
            elif hasattr(v, "jaxpr"):
                n += _count_dots(v.jaxpr)
    return n


def test_hook_names_in_forward_order():
    assert hook_names(1) == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_mid",
        "blocks.0.mlp.hook_post",
        "blocks.0.hook_mlp_out",
        "blocks.0.hook_resid_post",
    ]
    assert _lm().hook_names() == hook_names(3)
    assert "blocks.0.hook_resid_mid" not in _lm(parallel_residual=True).hook_names()


def test_unknown_site_lists_valid_names():
    lm = _lm(parallel_residual=True)
    with pytest.raises(
        ValueError, match=r"blocks\.7\.hook_resid_pre.*valid names.*blocks\.0\.mlp\.hook_post"
    ):
        lm.run_with_cache(TOKENS, ["blocks.7.hook_resid_pre"])
    with pytest.raises(ValueError, match="hook_resid_mid"):  # parallel residual has no resid_mid
        lm.run(TOKENS, splices={"blocks.0.hook_resid_mid": lambda x: x})[0]


@pytest.mark.parametrize("parallel", [False, True])
def test_residual_identities(parallel):
    lm = _lm(parallel_residual=parallel)
    _, c = lm.run_with_cache(TOKENS, lm.hook_names())
    for i in range(CFG.n_layers):
        b = f"blocks.{i}."
        pre, attn, mlp, post = (
            c[b + s] for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
        )
        if parallel:
            np.testing.assert_allclose(post, pre + attn + mlp, atol=1e-5)
        else:
            np.testing.assert_allclose(c[b + "hook_resid_mid"], pre + attn, atol=1e-5)
            np.testing.assert_allclose(post, c[b + "hook_resid_mid"] + mlp, atol=1e-5)
        if i + 1 < CFG.n_layers:
            np.testing.assert_array_equal(post, c[f"blocks.{i + 1}.hook_resid_pre"])
    assert c["blocks.0.mlp.hook_post"].shape == (2, 10, CFG.d_mlp)


def test_cache_fn_is_jitted_and_matches_eager():
    lm = _lm()
    sites = ["blocks.1.mlp.hook_post", "blocks.2.hook_resid_post"]
    fn, state = cache_fn(lm, sites, logits=True)
    logits, cache = fn(state, TOKENS)
    ref_logits, ref = lm.run_with_cache(TOKENS, sites, logits=True)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)  # jit fuses differently
    for s in sites:
        np.testing.assert_allclose(cache[s], ref[s], rtol=1e-4, atol=1e-4)
    assert lm.run_with_cache(TOKENS, sites)[0] is None  # logits only when asked for


def test_forward_stops_after_last_needed_site():
    lm = _lm()
    graphdef, state = nnx.split(lm)

    def dots(sites, logits=False):
        def f(s, t):
            return nnx.merge(graphdef, s).run_with_cache(t, sites, logits=logits)

        return _count_dots(jax.make_jaxpr(f)(state, TOKENS).jaxpr)

    per_block = dots(["blocks.1.hook_resid_pre"])
    assert dots(["blocks.0.hook_resid_pre"]) == 0
    assert dots([]) == 0
    assert dots(["blocks.0.mlp.hook_post"]) < per_block  # no MLP output projection
    assert dots(["blocks.2.hook_resid_post", "blocks.0.hook_resid_pre"]) == 3 * per_block
    assert dots([], logits=True) == 3 * per_block + 1  # + unembedding


def test_splice_replaces_value_seen_downstream():
    lm = _lm()
    ident = {s: (lambda x: x) for s in lm.hook_names()}
    np.testing.assert_array_equal(lm.run(TOKENS, splices=ident)[0], lm(TOKENS))
    # Overwriting the residual stream entering block 1 with a constant leaves nothing of the
    # tokens downstream: logits become the same for any input, and the cache shows the splice.
    const = {"blocks.1.hook_resid_pre": lambda x: jnp.ones_like(x)}
    other = (TOKENS + 7) % 50
    np.testing.assert_allclose(
        lm.run(TOKENS, splices=const)[0], lm.run(other, splices=const)[0], atol=1e-5
    )
    _, c = lm.run(TOKENS, cache=["blocks.1.hook_resid_pre"], splices=const, logits=False)
    np.testing.assert_array_equal(c["blocks.1.hook_resid_pre"], 1.0)
    with pytest.raises(ValueError, match="shape"):
        lm.run(TOKENS, splices={"blocks.0.mlp.hook_post": lambda x: x[..., :3]})[0]


def test_splice_under_jit_with_traced_arguments():
    """An SAE-style splice whose parameters are jit arguments, not baked-in constants."""
    lm = _lm()
    graphdef, state = nnx.split(lm)
    site = "blocks.0.mlp.hook_post"

    @jax.jit
    def spliced(state, scale, tokens):
        return nnx.merge(graphdef, state).run(tokens, splices={site: lambda x: x * scale})[0]

    np.testing.assert_allclose(spliced(state, 1.0, TOKENS), lm(TOKENS), rtol=1e-4, atol=1e-4)
    zero = lm.run(TOKENS, splices={site: jnp.zeros_like})[0]
    np.testing.assert_allclose(spliced(state, 0.0, TOKENS), zero, rtol=1e-4, atol=1e-4)


def test_attention_mask_hides_padded_keys():
    lm = _lm()
    mask = jnp.ones_like(TOKENS).at[:, 2].set(0)
    changed = TOKENS.at[:, 2].set((TOKENS[:, 2] + 1) % 50)
    keep = np.arange(10) != 2
    a, b = lm(TOKENS, attention_mask=mask), lm(changed, attention_mask=mask)
    np.testing.assert_allclose(a[:, keep], b[:, keep], atol=1e-5)
    assert np.abs(lm(TOKENS) - lm(changed))[:, 5:].max() > 1e-3  # unmasked, the change shows


def test_sliding_window_limits_receptive_field():
    lm = _lm(n_layers=1, sliding_windows=(3,))
    changed = TOKENS.at[:, 0].set((TOKENS[:, 0] + 1) % 50)
    diff = np.abs(lm(TOKENS) - lm(changed)).max(axis=(0, 2))
    assert diff[1:3].min() > 1e-4  # positions 1, 2 still see position 0
    assert diff[3:].max() < 1e-6  # position 3 and later do not


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_lm(missing)
    with pytest.raises(FileNotFoundError, match=f"config.json in {tmp_path}"):
        load_lm(tmp_path)


def test_init_lm_params_carry_logical_axes():
    cfg = dataclasses.replace(CFG, n_layers=1, d_mlp=8, vocab_size=8)
    lm = init_lm(cfg)
    assert lm.blocks[0].attn.wq.get_metadata()["out_sharding"] == ("d_model", "heads", "d_head")
    assert lm.blocks[0].mlp.w_out.get_metadata()["out_sharding"] == ("d_mlp", "d_model")
    assert lm.unembed.get_metadata()["out_sharding"] == ("d_model", "vocab")
    assert float(jnp.std(lm.blocks[0].attn.wq[...])) == pytest.approx(0.02, rel=0.3)


def test_hub_ids_go_to_snapshot_download(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, allow_patterns, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_dir("EleutherAI/pythia-70m") == tmp_path
    assert calls[0][0] == "EleutherAI/pythia-70m"
    assert {"config.json", "*.safetensors", "*.safetensors.index.json"} <= set(calls[0][1])


def test_towards_monosemanticity_config(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=128, n_inner=512, activation_function="relu").save_pretrained(
        tmp_path
    )
    cfg = lm_config(tmp_path)
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.act) == (1, 128, 512, "relu")
    assert "blocks.0.mlp.hook_post" in hook_names(cfg.n_layers)
