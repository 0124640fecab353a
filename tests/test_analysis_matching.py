"""Feature matching (analysis.matching), feature splitting (analysis.splitting) and `compare`.

The streaming statistics are checked against brute-force numpy over all counted tokens (the
masked cosine with an explicit union mask), across batch boundaries; the tree against a split
built by hand; `compare` end to end on the tiny world.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.analysis.compare import compare, format_summary
from saejax.analysis.matching import (Similarity, best_matches, decoder_cosine, init_stats,
                                      neuron_features, sae_features, stream_similarities,
                                      update_stats)
from saejax.analysis.splitting import Level, build_tree, draw_family, tree_from_similarities
from saejax.text.tokens import TokenDataset

SITE = "blocks.0.mlp.hook_post"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- brute force ---------------------------------------------------------------------------------


def brute_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[F_A, F_B] Pearson correlation over rows, float64, NaN for constant columns."""
    a, b = a - a.mean(0), b - b.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a.T @ b) / np.sqrt(np.outer((a * a).sum(0), (b * b).sum(0)))


def brute_union_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[F_A, F_B] cosine over U = {rows where a_i > 0 or b_j > 0}, the mask written out."""
    union = (a[:, :, None] > 0) | (b[:, None, :] > 0)  # [N, F_A, F_B]
    ab = np.einsum("tij,ti,tj->ij", union, a, b)
    aa = np.einsum("tij,ti->ij", union, a * a)
    bb = np.einsum("tij,tj->ij", union, b * b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ab / np.sqrt(aa * bb)


def plain_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a.T @ b) / np.sqrt(np.outer((a * a).sum(0), (b * b).sum(0)))


def accumulate(a: np.ndarray, b: np.ndarray, w: np.ndarray, *, signed: bool,
               batch: int = 64) -> Similarity:
    """Statistics of hand-made activations fed `batch` rows at a time; the last batch is padded
    with uncounted (w = 0) garbage rows, which must not count (and one shape compiles once)."""
    state = init_stats(a.shape[1], b.shape[1], signed=signed)
    step = jax.jit(update_stats)
    pad = -len(a) % batch
    a, b = (np.concatenate([x, np.full((pad, x.shape[1]), -7.0, np.float32)]) for x in (a, b))
    w = np.concatenate([w, np.zeros(pad, np.float32)])
    for lo in range(0, len(a), batch):
        state = step(state, *(jnp.asarray(x[lo:lo + batch]) for x in (a, b, w)))
    return Similarity(("A", "B"), state)


# -- the statistics on hand-made data --------------------------------------------------------------


def test_masked_cosine_union_definition_signed_and_nonnegative():
    rng = np.random.default_rng(0)
    n = 300
    a, b = rng.normal(size=(n, 5)), rng.normal(size=(n, 4)) + 0.3 * rng.normal(size=(n, 1))
    b[:, 3] = np.where(rng.random(n) < 0.7, 0.0, b[:, 3])  # one sparse-ish column
    w = (rng.random(n) < 0.8).astype(np.float32)  # uncounted rows must not count
    kept = w > 0
    # Signed: the union mask matters and the statistics apply it exactly.
    sim = accumulate(a.astype(np.float32), b.astype(np.float32), w, signed=True)
    want = brute_union_cosine(a[kept], b[kept])
    np.testing.assert_allclose(np.asarray(sim.masked_cosine()), want, atol=2e-5)
    assert np.abs(want - plain_cosine(a[kept], b[kept])).max() > 0.05  # a real difference
    np.testing.assert_allclose(np.asarray(sim.correlation()),
                               brute_correlation(a[kept], b[kept]), atol=2e-5)
    # Non-negative: masked cosine over the union == plain cosine over every token, and the
    # cheap (unsigned) statistics give it.
    ra, rb = np.maximum(a, 0), np.maximum(b, 0)
    ra[:, 0] = 0.0  # a dead feature: undefined everywhere
    union = brute_union_cosine(ra[kept], rb[kept])
    np.testing.assert_allclose(union, plain_cosine(ra[kept], rb[kept]), atol=1e-12)
    for signed in (False, True):
        s = accumulate(ra.astype(np.float32), rb.astype(np.float32), w, signed=signed)
        np.testing.assert_allclose(np.asarray(s.masked_cosine()), union, atol=2e-5)
        assert np.isnan(np.asarray(s.masked_cosine())[0]).all()
        assert np.isnan(np.asarray(s.correlation())[0]).all()
    np.testing.assert_array_equal(s.fires_a, (ra[kept] > 0).sum(0))
    np.testing.assert_array_equal(np.asarray(s.cofires),
                                  ((ra[kept] > 0).T.astype(int) @ (rb[kept] > 0).astype(int)))
    assert s.n_tokens == kept.sum()


def test_unsigned_statistics_refuse_negative_activations():
    a = np.array([[1.0], [-2.0], [0.5]], np.float32)
    with pytest.raises(ValueError, match="'A' was declared non-negative.*-2"):
        accumulate(a, np.abs(a), np.ones(3, np.float32), signed=False)


def test_correlation_is_accurate_with_a_large_mean():
    # Σab − ΣaΣb/n in float32 would lose every digit here; the merged co-moments do not.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 1))
    a = 1000.0 + x + 0.5 * rng.normal(size=(4000, 1))
    b = np.concatenate([2000.0 + x, -x], axis=1)
    sim = accumulate(a.astype(np.float32), b.astype(np.float32), np.ones(4000, np.float32),
                     signed=True, batch=1024)
    np.testing.assert_allclose(np.asarray(sim.correlation()), brute_correlation(a, b), atol=1e-4)


def test_best_matches_skip_dead_and_nan():
    sim = jnp.array([[0.2, 0.9, np.nan], [np.nan, np.nan, np.nan], [0.5, 0.1, 0.99]])
    m = best_matches(sim, np.array([True, True, False]), np.array([True, True, False]),
                     "correlation")
    np.testing.assert_array_equal(m.index, [1, -1, -1])  # row 1: nothing defined; row 2 dead
    np.testing.assert_allclose(m.value[0], 0.9)
    assert np.isnan(m.value[1:]).all()
    s = m.summary()
    assert (s["n_alive"], s["n_dead"], s["median"]) == (2, 1, pytest.approx(0.9))


def test_decoder_cosine_by_hand():
    wa = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    wb = jnp.array([[0.0, 2.0], [-1.0, 0.0]])
    got = np.asarray(decoder_cosine(wa, wb))
    np.testing.assert_allclose(got[0], [0.8, -0.6], atol=1e-6)
    assert np.isnan(got[1]).all()
    with pytest.raises(ValueError, match="different widths"):
        decoder_cosine(wa, jnp.ones((2, 3)))


# -- streaming over text ---------------------------------------------------------------------------


def site_rows(world, sets, contexts, lm_path=None):
    """Every counted position's features of each set, float64 [N, F] (brute-force reference)."""
    from saejax.lm.stream import site_batches
    from saejax.lm import load_lm

    lm = load_lm(lm_path or world.lm)
    sites = sorted({s.site for s in sets})
    rows = [[] for _ in sets]
    for batch in site_batches(lm, TokenDataset(world.tokens), sites, contexts,
                              batch_contexts=len(contexts)):
        for k, s in enumerate(sets):
            x = batch.acts[s.site].reshape(-1, s.d_in)
            f = np.asarray(s.encode(s.params, x), np.float64)
            rows[k].append(f[batch.mask.reshape(-1)])
    return [np.concatenate(r) for r in rows]


def test_streaming_statistics_equal_brute_force(tiny_world):
    from saejax.eval.trained import load_sae

    w = tiny_world
    sets = [sae_features(load_sae(w.sae_small)), sae_features(load_sae(w.sae_small_seed1)),
            neuron_features(str(w.lm), SITE, 64),
            neuron_features(str(w.lm), "blocks.0.hook_resid_post", 32)]
    assert sets[2].nonnegative and not sets[3].nonnegative  # ReLU MLP vs residual stream
    contexts = range(32)  # two batches
    sims = stream_similarities(TokenDataset(w.tokens), sets, [(0, 1), (0, 2), (3, 0)], contexts,
                               batch_contexts=16)
    rows = site_rows(w, sets, list(contexts))
    for sim, (i, j) in zip(sims, [(0, 1), (0, 2), (3, 0)]):
        a, b = rows[i], rows[j]
        assert sim.n_tokens == len(a) > 400  # BOS positions skipped
        assert sim.signed == (j == 0)  # the residual stream pair
        np.testing.assert_allclose(np.asarray(sim.correlation()), brute_correlation(a, b),
                                   atol=5e-5)
        np.testing.assert_allclose(np.asarray(sim.masked_cosine()), brute_union_cosine(a, b),
                                   atol=5e-5)
        np.testing.assert_array_equal(sim.fires_a, (a > 0).sum(0))
        np.testing.assert_array_equal(np.asarray(sim.cofires),
                                      (a > 0).T.astype(int) @ (b > 0).astype(int))
    # The residual stream is signed: there the union mask differs from the plain cosine.
    a, b = rows[3], rows[0]
    assert np.nanmax(np.abs(brute_union_cosine(a, b) - plain_cosine(a, b))) > 0.01


def test_width_mismatch_is_named(tiny_world):
    from saejax.eval.trained import load_sae

    good = sae_features(load_sae(tiny_world.sae_small))
    bad = dataclasses.replace(neuron_features(str(tiny_world.lm), SITE, 64), d_in=32, name="n32")
    with pytest.raises(ValueError, match="'n32' takes d_in=32 .* has width 64"):
        stream_similarities(TokenDataset(tiny_world.tokens), [good, bad], [(0, 1)], range(4))


# -- feature splitting by hand ---------------------------------------------------------------------


def hand_levels() -> list[np.ndarray]:
    """20 tokens. Level 0: f0 on 0-9, f1 on 10-19. Level 1: f0 split in two (0-4, 5-9), f1
    copied, one dead feature. Level 2: 0-4 copied, 10-19 split 3 + 7, one stray feature."""
    def feats(*spans):
        m = np.zeros((20, len(spans)), np.float32)
        for k, toks in enumerate(spans):
            m[list(toks), k] = 1.0
        return m

    return [feats(range(0, 10), range(10, 20)),
            feats(range(0, 5), range(5, 10), range(10, 20), []),
            feats(range(0, 5), range(10, 13), range(13, 20), [5, 15])]


def test_family_tree_of_a_hand_made_split(tmp_path):
    lv = hand_levels()
    ones = np.ones(20, np.float32)
    sims = [accumulate(lv[k], lv[k + 1], ones, signed=False, batch=8) for k in range(2)]
    sims = [Similarity((f"L{k}", f"L{k + 1}"), s.state) for k, s in enumerate(sims)]
    tree = tree_from_similarities(sims, threshold=0.4, min_fires=1)
    r = 1 / np.sqrt(2)
    got = {(e.level, e.parent, e.child): e.weight for e in tree.edges}
    want = {(1, 0, 0): r, (1, 0, 1): r, (1, 1, 2): 1.0,
            (2, 0, 0): 1.0, (2, 2, 1): 3 / np.sqrt(30), (2, 2, 2): 7 / np.sqrt(70)}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6)
    # The stray feature's best parent (1 of 2 tokens shared with L1 #1) stays below threshold.
    assert tree.best_parent[1][3] == pytest.approx(1 / np.sqrt(10), abs=1e-6)
    assert not tree.levels[1].alive[3]  # the dead one is not linked
    splits = tree.splits()
    assert [(s.level, s.parent, [c for c, _ in s.children]) for s in splits] == [
        (0, 0, [0, 1]), (1, 2, [2, 1])]  # mean weight 0.707 before 0.692
    assert tree.root_of(2, 1) == (0, 1)
    assert tree.family(0, 1) == [[1], [2], [2, 1]]  # strongest child first
    assert tree.pick_family() == (0, 0)
    png = draw_family(tree, 0, 1, tmp_path / "f.png", labels={1: {2: "copy"}, "L2": {1: "x"}})
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 2000


def test_build_tree_checks_shapes():
    levels = [Level("a", np.ones(2, bool)), Level("b", np.ones(3, bool))]
    with pytest.raises(ValueError, match=r"sims\[0\] has shape \(3, 2\).*\(2, 3\)"):
        build_tree(levels, [np.zeros((3, 2))])
    with pytest.raises(ValueError, match="2 levels need 1"):
        build_tree(levels, [])


# -- compare ---------------------------------------------------------------------------------------


def export_like(src_params: dict, out, lm, site=SITE, n: int | None = None):
    """An SAELens folder with (the first n features of) src_params, reading `lm` at `site`."""
    from saejax.export import export_saelens

    p = {k: np.asarray(v) for k, v in src_params.items()}
    if n is not None:
        p = {"W_enc": p["W_enc"][:, :n], "b_enc": p["b_enc"][:n], "W_dec": p["W_dec"][:n],
             "b_dec": p["b_dec"]}
    meta = {"model_name": str(lm), "hook_name": site} if lm else None
    return export_saelens(out, p, architecture="standard", metadata=meta)


@pytest.fixture(scope="module")
def other_lms(tiny_world, tmp_path_factory):
    """(the tiny world's architecture at seed 1; a config-only LM with 8 more tokens)."""
    from saejax.lm import init_lm, lm_config
    from saejax.lm.save import save_hf

    root = tmp_path_factory.mktemp("other_lms")
    cfg = lm_config(tiny_world.lm)
    seed1 = save_hf(init_lm(cfg, seed=1), cfg, root / "lm_seed1", tiny_world.tokenizer)
    wide = root / "lm_vocab"  # the vocabulary check reads config.json only
    wide.mkdir()
    hf = json.loads((seed1 / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**hf, "vocab_size": hf["vocab_size"] + 8}))
    return seed1, wide


def test_compare_sae_with_itself(tiny_world, tmp_path):
    w = tiny_world
    res = compare([w.sae_small, w.sae_export], w.tokens, tmp_path, contexts="0:32",
                  batch_contexts=16, neurons=True, min_fires=3)
    on_disk = json.loads((tmp_path / "compare.json").read_text())
    assert on_disk["features"] == json.loads(json.dumps(res["features"]))
    assert res["n_tokens"] > 400
    for measure in ("correlation", "masked_cosine", "decoder_cosine"):
        for way in ("a_to_b", "b_to_a"):
            s = res["features"][measure][way]
            assert s["n_alive"] > 10 and s["n_alive"] + s["n_dead"] == 64
            values = [v for v in res["per_feature"][measure][way]["value"] if v is not None]
            assert len(values) == s["n_alive"] and min(values) > 1 - 1e-4, (measure, way)
    for measure in ("correlation", "masked_cosine"):  # same LM: each neuron matches itself
        assert res["neurons"][measure]["a_to_b"]["median"] == pytest.approx(1.0, abs=1e-5)
    assert res["neurons_note"] and not (tmp_path / "splitting.json").exists()
    text = format_summary(res)
    assert "sae_small (64) vs sae_small_export (64)" in text and "neurons correlation" in text


def test_compare_across_lms_with_neuron_baseline(tiny_world, other_lms, tmp_path):
    from saejax.eval.trained import load_sae

    w, lm1 = tiny_world, other_lms[0]
    sae_b = export_like(load_sae(w.sae_small_seed1).params, tmp_path / "sae_lm1", lm1)
    res = compare([w.sae_small, sae_b], w.tokens, tmp_path / "out", contexts="0:32",
                  batch_contexts=16, neurons=True, min_fires=3)
    assert "decoder_cosine" not in res["features"] and res["decoder_cosine_note"]
    # The neuron baseline across the two LMs, against brute force on each LM's own pass.
    sets = [neuron_features(str(w.lm), SITE, 64)]
    n0 = site_rows(w, sets, list(range(32)))[0]
    n1 = site_rows(w, sets, list(range(32)), lm_path=lm1)[0]
    corr = brute_correlation(n0, n1)
    alive0, alive1 = (n0 > 0).sum(0) >= 3, (n1 > 0).sum(0) >= 3
    best = np.nanmax(np.where(alive1[None, :], corr, np.nan)[alive0], axis=1)
    assert res["neurons"]["correlation"]["a_to_b"]["median"] == pytest.approx(
        float(np.median(best)), abs=1e-4)
    assert res["neurons"]["correlation"]["a_to_b"]["median"] < 0.99  # different random LMs
    assert "note: different LMs" in format_summary(res)


def test_compare_traces_splitting_across_three_sizes(tiny_world, tmp_path):
    from saejax.eval.trained import load_sae

    w = tiny_world
    large = load_sae(w.sae_large)
    mid = export_like(large.params, tmp_path / "sae_mid", large.lm_path, n=128)  # L2's first half
    res = compare([w.sae_small, mid, w.sae_large], w.tokens, tmp_path / "out", contexts="0:48",
                  batch_contexts=16, min_fires=2, labels={"1": {"0": "zero"}})
    assert not (tmp_path / "out" / "compare.json").exists()
    sp = json.loads((tmp_path / "out" / "splitting.json").read_text())
    assert [lv["n_features"] for lv in sp["levels"]] == [64, 128, 256]
    # Level 2's first 128 features are level 1's: each alive one has a parent at cosine 1.
    to_parent = {c: (p, wt) for lv, p, c, wt in sp["edges"] if lv == 2}
    alive = sp["levels"][1]["n_alive"]
    ones = [c for c in range(128) if c in to_parent and to_parent[c][1] > 1 - 1e-5]
    assert len(ones) == alive > 10
    assert all(wt >= 0.4 for *_, wt in sp["edges"])
    png = tmp_path / "out" / "splitting.png"
    assert sp["figure"] == "splitting.png" and png.read_bytes()[:8] == PNG_MAGIC
    assert "splitting 64 -> 128 -> 256" in format_summary(res)


def test_compare_errors(tiny_world, other_lms, tmp_path):
    from saejax.eval.trained import load_sae

    w = tiny_world
    with pytest.raises(ValueError, match="at least 2 SAEs, got 1"):
        compare([w.sae_small], w.tokens, tmp_path)
    params = load_sae(w.sae_small).params
    narrow = {"W_enc": np.ones((32, 8), np.float32), "b_enc": np.zeros(8, np.float32),
              "W_dec": np.ones((8, 32), np.float32), "b_dec": np.zeros(32, np.float32)}
    narrow = export_like(narrow, tmp_path / "narrow", w.lm, site="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="same width: sae_small has d_in=64, narrow has d_in=32"):
        compare([w.sae_small, narrow], w.tokens, tmp_path)
    vocab = export_like(params, tmp_path / "vocab", other_lms[1])
    with pytest.raises(ValueError, match="different vocabularies"):
        compare([w.sae_small, vocab], w.tokens, tmp_path)
    with pytest.raises(ValueError, match="increasing size; got sizes \\[64, 256, 64\\]"):
        compare([w.sae_small, w.sae_large, w.sae_small_seed1], w.tokens, tmp_path)
    anon = export_like(params, tmp_path / "anon", None)
    with pytest.raises(ValueError, match="does not record the LM and site"):
        compare([w.sae_small, anon], w.tokens, tmp_path)
