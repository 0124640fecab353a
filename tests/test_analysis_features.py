"""Feature analysis: streaming top-k / reservoir samples / statistics against brute force,
logit effects against a hand computation and the LM's own splice, and the analysis directory."""

import codecs
import functools
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from saejax.analysis.features import analyze, feature, load_analysis
from saejax.analysis.logit_effects import direct_logits, direct_path, logit_effects
from saejax.analysis.topk_stream import (StreamOptions, init_state, priorities, stream_features,
                                         update)
from saejax.eval.trained import load_sae
from saejax.export import WEIGHTS_FILENAME
from saejax.lm.load import load_lm
from saejax.lm.stream import site_batches
from saejax.text.labels import TokenStrings, token_bytes
from saejax.text.tokenizer import load_tokenizer
from saejax.text.tokens import TokenDataset

N_CONTEXTS = 50
DEAD = 5  # a feature killed in the fixture's SAE


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """The SAELens export of sae_small with feature DEAD killed (b_enc = -1e4), the LM, the
    tokens, and brute-force activations f [N_CONTEXTS, T, F] with the counted-position mask."""
    sae_dir = tmp_path_factory.mktemp("sae") / "sae_dead"
    shutil.copytree(tiny_world.sae_export, sae_dir)
    weights = safetensors.numpy.load_file(str(sae_dir / WEIGHTS_FILENAME))
    weights["b_enc"][DEAD] = -1e4
    safetensors.numpy.save_file(weights, str(sae_dir / WEIGHTS_FILENAME))
    sae, lm, tokens = load_sae(sae_dir), load_lm(tiny_world.lm), TokenDataset(tiny_world.tokens)
    (batch,) = site_batches(lm, tokens, [sae.site], range(N_CONTEXTS), batch_contexts=N_CONTEXTS)
    f = np.asarray(jax.jit(sae.encode)(sae.params, batch.acts[sae.site]))
    f = np.where(batch.mask[..., None], f, 0.0)
    return dict(sae_dir=sae_dir, sae=sae, lm=lm, tokens=tokens, f=f, mask=batch.mask,
                ids=batch.tokens, tokenizer=load_tokenizer(tiny_world.lm), tw=tiny_world)


def test_stream_matches_brute_force(world):
    sae, f, mask = world["sae"], world["f"], world["mask"]
    F = sae.n_features
    # 7 contexts per batch (50 = 7 * 7 + 1) and 37-token chunks (112 = 3 * 37 + 1): examples
    # cross both batch and chunk boundaries.
    opts = StreamOptions(top_k=6, n_samples=4, chunk_elements=37 * F, seed=3)
    s = stream_features(sae, world["lm"], world["tokens"], range(N_CONTEXTS), opts,
                        batch_contexts=7)
    flat = f.reshape(-1, F)
    fired = flat > 0
    assert s.n_tokens == mask.sum()
    np.testing.assert_array_equal(s.state.n_fired, fired.sum(0))
    assert s.state.n_fired[DEAD] == 0 and s.top(DEAD) == [] and s.samples(DEAD) == []
    np.testing.assert_allclose(s.state.max_act, flat.max(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s.density, fired.sum(0) / mask.sum())
    mean = flat.sum(0) / np.maximum(fired.sum(0), 1)
    np.testing.assert_allclose(s.mean_act, mean, rtol=1e-4)
    bins = opts.hist_bin(flat)
    for j in range(F):
        hist = np.bincount(bins[fired[:, j], j], minlength=opts.hist_bins + 2)
        np.testing.assert_array_equal(s.state.hist[j], hist, err_msg=f"feature {j}")
        # Top-k: the k largest activations, at k distinct places that really have them (so a
        # valid top-k however ties are broken).
        order = np.argsort(-flat[:, j], kind="stable")[:opts.top_k]
        want = flat[order, j][flat[order, j] > 0]
        got = s.top(j)
        np.testing.assert_allclose([e.act for e in got], want, rtol=1e-4, atol=1e-6,
                                   err_msg=f"feature {j}")
        assert len({(e.context, e.pos) for e in got}) == len(got)
        for e in got:
            np.testing.assert_allclose(f[e.context, e.pos, j], e.act, rtol=1e-4, atol=1e-6)
        # Samples: distinct firing examples, as many as there can be, sorted by activation.
        smp = s.samples(j)
        assert len(smp) == min(opts.n_samples, fired[:, j].sum())
        assert len({(e.context, e.pos) for e in smp}) == len(smp)
        assert [e.act for e in smp] == sorted((e.act for e in smp), reverse=True)
        for e in smp:
            assert mask[e.context, e.pos]
            np.testing.assert_allclose(f[e.context, e.pos, j], e.act, rtol=1e-4, atol=1e-6)


@functools.cache
def _update(opts):
    return jax.jit(partial(update, opts=opts))


def _feed(opts, f, chunk, seed_key):
    """Stream f [N, F] (token i at context i // 4, position i % 4) chunk tokens at a time."""
    state = init_state(f.shape[1], opts)
    step = _update(opts)
    for lo in range(0, len(f), chunk):
        i = np.arange(lo, min(lo + chunk, len(f)), dtype=np.int32)
        state = step(state, jnp.asarray(f[i]), i // 4, i % 4, np.ones(len(i), bool), seed_key)
    return jax.device_get(state)


def test_reservoir_sample_is_uniform_and_deterministic():
    """1000 features fire on all 50 tokens; each keeps 5: every token should be in ~100 samples.
    The chi-square statistic (49 dof) is below 85 with probability 0.999 under uniformity; a
    sampler that favours early or late chunks, or large activations, fails it."""
    rng = np.random.default_rng(0)
    N, F, S = 50, 1000, 5
    f = rng.exponential(1.0, (N, F)).astype(np.float32) + 0.01
    opts = StreamOptions(top_k=1, n_samples=S)
    st = _feed(opts, f, 10, jax.random.key(7))
    tok = st.smp_ctx * 4 + st.smp_pos  # [F, S] token ids
    assert (st.smp_pri >= 0).all()
    assert all(len(set(row)) == S for row in tok)
    np.testing.assert_array_equal(st.smp_act, f[tok, np.arange(F)[:, None]])
    counts = np.bincount(tok.ravel(), minlength=N)
    expected = F * S / N
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 85, (chi2, counts)
    # Sampled activations are not biased to the top: their mean is the population's.
    assert abs(st.smp_act.mean() - f.mean()) < 0.1
    # Deterministic given the seed, whatever the chunking; another seed gives another sample.
    again = _feed(opts, f, 25, jax.random.key(7))
    np.testing.assert_array_equal(again.smp_ctx * 4 + again.smp_pos, tok)
    other = _feed(opts, f, 10, jax.random.key(8))
    assert (other.smp_ctx * 4 + other.smp_pos != tok).any()


def test_reservoir_sample_only_holds_firing_examples():
    rng = np.random.default_rng(1)
    N, F = 40, 16
    f = rng.exponential(1.0, (N, F)).astype(np.float32)
    f[(np.arange(N)[:, None] + np.arange(F)) % 3 != 0] = 0.0  # feature j fires on 1/3 of tokens
    f[:, 0] = 0.0  # never fires
    f[:, 1] = 0.0
    f[7, 1] = 2.0  # fires once
    st = _feed(StreamOptions(top_k=3, n_samples=6), f, 8, jax.random.key(0))
    for j in range(F):
        valid = st.smp_pri[j] >= 0
        tok = (st.smp_ctx[j] * 4 + st.smp_pos[j])[valid]
        assert valid.sum() == min(6, (f[:, j] > 0).sum())
        assert (f[tok, j] > 0).all()
    assert (st.top_act[0] == 0).all() and st.top_act[1, 0] == 2.0 and (st.top_act[1, 1:] == 0).all()


def test_priorities_uniform_and_keyed_by_place():
    key = jax.random.key(0)
    ctx, pos = jnp.array([0, 0, 5], jnp.int32), jnp.array([1, 2, 1], jnp.int32)
    prio = jax.jit(priorities, static_argnums=3)
    p = np.asarray(prio(key, ctx, pos, 20000))
    assert ((p >= 0) & (p < 1)).all()
    assert abs(p.mean() - 0.5) < 0.01 and abs(p.var() - 1 / 12) < 0.005
    np.testing.assert_array_equal(np.asarray(prio(key, ctx[2:], pos[2:], 20000)), p[2:])
    assert np.corrcoef(p[0], p[1])[0, 1] < 0.05


def _by_hand(lm, site, w_dec):
    """W_dec row -> W_out -> LayerNorm's linear part (centre, gain) -> unembedding, in numpy."""
    v = np.asarray(w_dec, np.float64)
    if site.endswith("mlp.hook_post"):
        v = v @ np.asarray(lm.blocks[0].mlp.w_out[...], np.float64)
    v = (v - v.mean(-1, keepdims=True)) * np.asarray(lm.ln_final.scale[...], np.float64)
    w_u = lm.embed[...].T if lm.unembed is None else lm.unembed[...]
    return v @ np.asarray(w_u, np.float64)


def test_logit_effects_equal_hand_computation(world):
    sae, lm = world["sae"], world["lm"]
    w_dec = np.asarray(sae.params["W_dec"])
    want = _by_hand(lm, sae.site, w_dec)
    vocab = want.shape[1]
    # 5 features per chunk: 64 = 12 * 5 + 4, the last chunk padded.
    eff = logit_effects(lm, sae.site, sae.params["W_dec"], n=5, chunk_elements=5 * vocab)
    for j in range(sae.n_features):
        np.testing.assert_array_equal(eff.promoted_ids[j], np.argsort(-want[j])[:5])
        np.testing.assert_array_equal(eff.suppressed_ids[j], np.argsort(want[j])[:5])
        np.testing.assert_allclose(eff.promoted[j], np.sort(want[j])[::-1][:5], rtol=1e-4)
        np.testing.assert_allclose(eff.suppressed[j], np.sort(want[j])[:5], rtol=1e-4)
    # A residual site skips W_out.
    dirs = np.random.default_rng(0).normal(size=(3, lm.cfg.d_model)).astype(np.float32)
    path = direct_path(lm, "blocks.0.hook_resid_post")
    np.testing.assert_allclose(direct_logits(path, dirs, True),
                               _by_hand(lm, "blocks.0.hook_resid_post", dirs), rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(ValueError, match="W_dec has shape"):
        logit_effects(lm, "blocks.0.hook_resid_post", sae.params["W_dec"])
    with pytest.raises(ValueError, match="unknown hook site"):
        direct_path(lm, "blocks.3.hook_mlp_out")


def test_logit_effects_match_the_lms_splice(world):
    """One-layer model, MLP site: adding eps * W_dec[j] at a position changes that position's
    logits by exactly the direct effect, up to the final LayerNorm's scale 1/sigma and its
    projection off the normalised residual x_hat (first order in eps)."""
    sae, lm = world["sae"], world["lm"]
    path = direct_path(lm, sae.site)
    tokens = jnp.asarray(world["tokens"].take([3]))
    clean, cache = lm.run(tokens, cache=["blocks.0.hook_resid_post"])
    resid = np.asarray(cache["blocks.0.hook_resid_post"][0], np.float64)
    gain = np.asarray(lm.ln_final.scale[...], np.float64)
    w_u = np.asarray(lm.embed[...].T if lm.unembed is None else lm.unembed[...], np.float64)
    eps = 1e-3
    for j in (0, 1, 3):
        direct = np.asarray(direct_logits(path, sae.params["W_dec"][j:j + 1], True))[0]
        u = np.asarray(path.proj, np.float64).T @ np.asarray(sae.params["W_dec"][j], np.float64)
        u -= u.mean()
        for p in (5, 12):
            d = eps * sae.params["W_dec"][j]
            spliced = lm.run(tokens, splices={sae.site: lambda h, p=p, d=d: h.at[:, p].add(d)})[0]
            exact = np.asarray(spliced - clean, np.float64)[0, p] / eps
            r = resid[p] - resid[p].mean()
            sigma = np.sqrt((r ** 2).mean() + lm.cfg.norm_eps)
            x_hat = r / sigma
            projection = (x_hat @ u / len(u)) * (gain * x_hat) @ w_u
            np.testing.assert_allclose(sigma * exact + projection, direct, atol=2e-2 * np.abs(
                direct).max())
            rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731
            assert np.corrcoef(rank(exact), rank(direct))[0, 1] > 0.9


def test_token_strings_keep_bytes_of_split_characters(world):
    tok = world["tokenizer"]
    text = "بسم الله кошка the cat"
    ids = tok.encode(text, add_special_tokens=False)
    strings = TokenStrings(tok)(ids)
    assert len(strings) == len(ids)
    assert any("\\x" in s for s in strings)  # the tiny BPE splits some Arabic letters
    raw = b"".join(codecs.escape_decode(s.encode("utf-8"))[0] for s in strings)
    assert raw.decode("utf-8") == text
    assert strings[-1] == " cat"


def test_token_windows_show_split_characters_whole(world):
    """In a window, a character split over tokens is shown whole on its first token, so the
    window reads as the text; a cut at the window's start keeps the escapes."""
    tok = world["tokenizer"]
    text = "بسم الله кошка the cat"
    ids = tok.encode(text, add_special_tokens=False)
    strings = TokenStrings(tok)
    window = strings.window(ids)
    assert len(window) == len(ids) and "".join(window) == text
    assert "" in window  # some token holds only the tail of a split letter
    # Cut right after a token that starts a letter and does not finish it: the rest of that
    # letter opens the cut window, where it cannot be decoded, so it keeps its escapes.
    raw = token_bytes(tok)
    split = next(k for k, i in enumerate(ids[:-1]) if raw[i] and _ends_mid_character(raw[i]))
    cut = strings.window(ids[split + 1:])
    assert cut[0].startswith("\\x"), cut[:3]
    assert window[split + 1] == "" or not window[split + 1].startswith("\\x")  # whole in context


def _ends_mid_character(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"


def test_analysis_directory_round_trip(world, tmp_path):
    sae, f, ids, T = world["sae"], world["f"], world["ids"], world["f"].shape[1]
    n_ctx, (before, after) = 40, (3, 2)
    out = analyze(world["sae_dir"], world["tw"].tokens, tmp_path / "an", contexts=f"0:{n_ctx}",
                  top_k=4, n_samples=3, context_window=(before, after), batch_contexts=16,
                  n_logits=4, window_elements=32 * 7 * 6)  # two feature groups
    index = load_analysis(out)
    assert index["format"] == "saejax.analysis" and index["version"] == 1
    assert index["sae"]["site"] == sae.site and index["sae"]["n_features"] == sae.n_features
    assert index["tokens"]["contexts"] == "0:40"
    assert index["tokens"]["n_tokens"] == int(world["mask"][:n_ctx].sum())
    assert len(index["hist_edges"]) == 33
    assert [r["id"] for r in index["features"]] == list(range(sae.n_features))
    fired = (f[:n_ctx] > 0).sum((0, 1))
    assert [r["n_fired"] for r in index["features"]] == fired.tolist()
    strings = TokenStrings(world["tokenizer"])
    for j in (0, 1, DEAD, sae.n_features - 1):
        rec = feature(out, j)
        assert rec["id"] == j and rec["n_fired"] == fired[j]
        assert sum(rec["hist"]["counts"]) == fired[j]
        assert rec["explanation"] is None and rec["score"] is None
        assert len(rec["logits"]["promoted"]) == 4
        if j == DEAD:
            assert rec["top"] == [] and rec["samples"] == [] and rec["max_act"] == 0
            continue
        assert len(rec["top"]) == min(4, fired[j]) and len(rec["samples"]) == min(3, fired[j])
        acts = [e["act"] for e in rec["samples"]]
        assert acts == sorted(acts, reverse=True)
        for e in rec["top"] + rec["samples"]:
            c, p = e["context"], e["pos"]
            lo, hi = max(0, p - before), min(T, p + after + 1)
            assert e["tokens"] == strings.window(ids[c, lo:hi])
            for t, s in zip(ids[c, lo:hi], e["tokens"]):
                plain = world["tokenizer"].decode([t], clean_up_tokenization_spaces=False)
                assert s == plain or "\ufffd" in plain
            assert e["focus"] == p - lo
            np.testing.assert_allclose(e["acts"], f[c, lo:hi, j], rtol=1e-4, atol=1e-6)
            assert e["acts"][e["focus"]] == pytest.approx(e["act"], rel=1e-4)
    with pytest.raises(FileNotFoundError, match="no such feature"):
        feature(out, sae.n_features)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an analysis directory"):
        analyze(world["sae_dir"], world["tw"].tokens, tmp_path / "foreign")


def test_neuron_basis_features_are_the_neurons(tiny_world, tmp_path):
    """The identity SAE's features are the site's (post-ReLU) neurons, value for value."""
    import jax.numpy as jnp
    from saejax.analysis.neurons import export_neuron_basis
    from saejax.eval.trained import load_sae
    from saejax.lm.load import load_lm
    from saejax.text.tokens import TokenDataset
    from tiny_world import D_MLP, SITE

    sae = load_sae(export_neuron_basis(tiny_world.lm, SITE, D_MLP, tmp_path / "neurons"))
    assert (sae.site, sae.lm_path, sae.n_features) == (SITE, str(tiny_world.lm), D_MLP)
    lm = load_lm(tiny_world.lm)
    x = lm.run(jnp.asarray(TokenDataset(tiny_world.tokens).take(range(4))), cache=[SITE],
               logits=False)[1][SITE]
    assert float(x.min()) >= 0 and float((x > 0).mean()) > 0.1
    np.testing.assert_array_equal(np.asarray(sae.encode(sae.params, x)), np.asarray(x))
