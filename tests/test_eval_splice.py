"""Splice evaluation (saejax.eval.splice) and its entry point (saejax.eval.run) on the tiny world.

The reference for every loss is the LM's own forward (`lm.run(..., splices=...)`), eager, on all
contexts at once, with cross-entropy and KL computed in float64 numpy: independent of the jitted,
batched, summed pass under test.
"""

import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from saejax.eval.run import evaluate, format_table, resolve_lm
from saejax.eval.splice import splice_pass, summarize
from saejax.eval.trained import TrainedSAE, load_sae
from saejax.sae.config import SAEConfig

MLP_SITE = "blocks.0.mlp.hook_post"
RESID_SITE = "blocks.0.hook_resid_pre"
N_CONTEXTS, BATCH = 48, 16  # three equal batches: one compile per step


@pytest.fixture(scope="module")
def world(tiny_world):
    from saejax.lm.load import load_lm
    from saejax.text.tokens import TokenDataset

    lm = load_lm(tiny_world.lm)
    # The random-weight LM barely depends on its MLP and predicts nearly uniformly, so loss gaps
    # would be ~1e-3 nats. Amplify the MLP's output and sharpen the logits (activations at the
    # MLP site are unchanged, so the SAEs still fit) to make every difference measurable.
    w_out = lm.blocks[0].mlp.w_out
    w_out.set_value(w_out.get_value() * 30)
    lm.ln_final.scale.set_value(lm.ln_final.scale.get_value() * 10)
    tokens = TokenDataset(tiny_world.tokens)
    ids = range(len(tokens))[-N_CONTEXTS:]
    return tiny_world, lm, tokens, ids


def _sae(params, site, name):
    d, n = np.shape(params["W_enc"])
    return TrainedSAE({k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
                      SAEConfig(arch="relu", d_in=d, n_features=n), site, "", name,
                      source=f"<{name}>")


def identity_sae(site, d):
    """Reconstructs exactly: features relu(x_i) and relu(-x_i), decoded as their difference."""
    eye = np.eye(d, dtype=np.float32)
    return _sae({"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d),
                 "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d)},
                site, f"identity_{site}")


def random_sae(site, d, n, seed=0):
    """A poor SAE on the residual stream: its splice changes the loss a lot."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, d)) / np.sqrt(d)
    return _sae({"W_enc": w.T, "b_enc": np.zeros(n), "W_dec": w, "b_dec": np.zeros(d)},
                site, f"random_{site}")


def _ce_kl(logits, tok, mask, ref_logp=None):
    """float64 numpy: mean CE and KL(ref ‖ this) over predictions at counted positions."""
    lg = np.asarray(logits, np.float64)[:, :-1]
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    pm = mask[:, :-1]
    nll = -np.take_along_axis(logp, tok[:, 1:, None], -1)[..., 0]
    kl = None if ref_logp is None else (np.exp(ref_logp) * (ref_logp - logp)).sum(-1)[pm].mean()
    return nll[pm].mean(), kl, logp


def reference(lm, tokens, ids, sae, everywhere=False):
    """Direct computation for one SAE with the LM's own forward, splicing at counted positions
    (or at every position with everywhere=True)."""
    tok = tokens.take(ids)
    mask = tok != tokens.bos_id
    logits, cache = lm.run(jnp.asarray(tok), cache=[sae.site])
    x = np.asarray(cache[sae.site])
    clean, _, ref_logp = _ce_kl(logits, tok, mask)
    where = jnp.asarray(mask | everywhere)[..., None]

    def spliced(value):
        out = lm.run(jnp.asarray(tok), splices={sae.site: lambda a: jnp.where(where, value, a)})[0]
        return _ce_kl(out, tok, mask, ref_logp)[:2]

    mean = x[mask].mean(0)
    zero, zero_kl = spliced(jnp.zeros_like(x))
    mean_loss, mean_kl = spliced(jnp.broadcast_to(mean, x.shape))
    f = np.asarray(sae.encode(sae.params, jnp.asarray(x)))[mask]
    x_hat = np.asarray(sae.decode(sae.params, jnp.asarray(f)))
    x_j = jnp.asarray(x)
    loss, kl = spliced(sae.decode(sae.params, sae.encode(sae.params, x_j)).astype(x_j.dtype))
    xm = x[mask]
    return {
        "clean": clean, "loss": loss, "kl": kl,
        "zero_ablation_loss": zero, "zero_ablation_kl": zero_kl,
        "mean_ablation_loss": mean_loss, "mean_ablation_kl": mean_kl,
        "loss_recovered_zero": (zero - loss) / (zero - clean),
        "loss_recovered_mean": (mean_loss - loss) / (mean_loss - clean),
        "n_tokens": int(mask.sum()), "n_predictions": int(mask[:, :-1].sum()),
        "fvu": np.sum((x_hat - xm) ** 2) / np.sum((xm - mean) ** 2),
        "mse": np.mean((x_hat - xm) ** 2),
        "l0": (f > 0).sum(1).mean(), "fire_count": (f > 0).sum(0),
    }


def _evaluate(lm, tokens, ids, saes, means=None):
    totals = splice_pass(lm, saes, tokens, ids, batch_contexts=BATCH, means=means)
    return summarize(totals, saes), totals


LOSS_KEYS = ("loss", "kl", "zero_ablation_loss", "zero_ablation_kl", "mean_ablation_loss",
             "mean_ablation_kl")


@pytest.fixture(scope="module")
def joint(world):
    """Five SAEs on two sites in one pass: two trained sizes, a poor one on the residual stream,
    and exact reconstructions at both sites. (SAEs, summary, totals)."""
    w, lm, tokens, ids = world
    saes = [load_sae(w.sae_small), load_sae(w.sae_large), random_sae(RESID_SITE, 32, 48),
            identity_sae(MLP_SITE, 64), identity_sae(RESID_SITE, 32)]
    return (saes, *_evaluate(lm, tokens, ids, saes))


def test_matches_direct_lm_forward(world, joint):
    _, lm, tokens, ids = world
    saes, got, _ = joint
    for sae, r in list(zip(saes, got["saes"]))[:3]:
        ref = reference(lm, tokens, ids, sae)
        assert got["clean_loss"] == pytest.approx(ref["clean"], abs=1e-5)
        assert got["n_tokens"] == r["n_tokens"] == ref["n_tokens"]
        assert got["n_predictions"] == ref["n_predictions"]
        for k in LOSS_KEYS:
            assert r[k] == pytest.approx(ref[k], abs=2e-5), (sae.name, k)
        for k in ("loss_recovered_zero", "loss_recovered_mean"):
            assert r[k] == pytest.approx(ref[k], abs=1e-4), (sae.name, k)
        for k in ("fvu", "mse", "l0"):
            assert r[k] == pytest.approx(ref[k], rel=1e-4), (sae.name, k)
        assert r["dead"] == int(np.sum(ref["fire_count"] == 0))
        # the splice must change the loss measurably, or this test would prove little
        assert abs(ref["loss"] - ref["clean"]) > 5e-3
    # Splicing the resid_pre SAE at the BOS position too would change later predictions (via
    # attention): the pass splices at counted positions only, as the reference does.
    everywhere = reference(lm, tokens, ids, saes[2], everywhere=True)
    assert abs(everywhere["loss"] - got["saes"][2]["loss"]) > 1e-3


def test_joint_pass_equals_separate_passes(world, joint):
    _, lm, tokens, ids = world
    saes, got, totals = joint
    for i in (0, 2):  # one per site; the joint pass also held a larger SAE and exact ones
        alone, _ = _evaluate(lm, tokens, ids, [saes[i]], means=totals.site_means)
        a, r = alone["saes"][0], got["saes"][i]
        assert alone["clean_loss"] == pytest.approx(got["clean_loss"], rel=1e-6)
        for k in (*LOSS_KEYS, "loss_recovered_zero", "loss_recovered_mean", "fvu", "mse", "l0"):
            assert a[k] == pytest.approx(r[k], rel=1e-5, abs=1e-7), (saes[i].name, k)
        for k in ("dead", "ultralow", "dense", "l0_hist", "density_hist"):
            assert a[k] == r[k], (saes[i].name, k)


def test_perfect_reconstruction(world, joint):
    _, lm, tokens, ids = world
    _, got, totals = joint
    for r in got["saes"][3:]:
        assert r["loss"] == pytest.approx(got["clean_loss"], abs=1e-6)
        assert r["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
        assert r["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
        assert abs(r["kl"]) < 1e-6
        assert r["fvu"] < 1e-10 and r["mse"] < 1e-12
    # feature i fires where x_i > 0, feature d + i where x_i < 0
    tok = tokens.take(ids)
    mask = tok != tokens.bos_id
    x = np.asarray(lm.run(jnp.asarray(tok), cache=[RESID_SITE], logits=False)[1][RESID_SITE])
    xm = x[mask]
    want = np.concatenate([(xm > 0).sum(0), (xm < 0).sum(0)])
    np.testing.assert_array_equal(totals.counts[4]["fire_count"], want)
    assert got["saes"][4]["l0"] == pytest.approx((xm != 0).sum(1).mean())
    # MLP activations are ReLU outputs: the "negative" half never fires
    assert got["saes"][3]["dead"] >= 64


def _edited_export(src, dst, **metadata):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "cfg.json").read_text())
    cfg["metadata"].update(metadata)
    (dst / "cfg.json").write_text(json.dumps(cfg))
    return dst


def test_evaluate_writes_json_and_png(tiny_world, tmp_path):
    w = tiny_world
    # a copy recording another LM (the override below applies) and repeating a name
    other = _edited_export(w.sae_export, tmp_path / "x" / "sae_small", model_name="/elsewhere")
    out = tmp_path / "eval"
    res = evaluate([w.sae_small, other], w.tokens, contexts=f"-{N_CONTEXTS}:",
                   batch_contexts=BATCH, lm_path=str(w.lm), out_dir=out)
    a, b = res["saes"]
    assert (a["name"], b["name"]) == ("sae_small", "sae_small-2")
    # the export is the same SAE: same numbers
    for k in (*LOSS_KEYS, "fvu", "l0", "dead", "dense"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-8), k
    saved = json.loads((out / "eval.json").read_text())
    assert saved["n_tokens"] == res["n_tokens"] and saved["contexts"] == f"-{N_CONTEXTS}:"
    assert saved["clean_loss"] == pytest.approx(res["clean_loss"])
    assert [s["name"] for s in saved["saes"]] == ["sae_small", "sae_small-2"]
    for s in saved["saes"]:
        png = out / s["density_png"]
        assert png.name == f"{s['name']}_density.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(res)
    assert "sae_small-2" in table and MLP_SITE in table and "clean loss" in table


def test_errors(tiny_world, tmp_path, world):
    w = tiny_world
    other = _edited_export(w.sae_export, tmp_path / "other_lm", model_name="/elsewhere/lm")
    with pytest.raises(ValueError, match=r"different LMs.*sae_small.*other_lm.*/elsewhere/lm"):
        evaluate([w.sae_small, other], w.tokens)
    no_lm = _edited_export(w.sae_export, tmp_path / "no_lm", model_name="")
    with pytest.raises(ValueError, match="no_lm.*records no LM"):
        evaluate([no_lm], w.tokens)
    bad_site = _edited_export(w.sae_export, tmp_path / "bad_site",
                              hook_name="blocks.3.hook_mlp_out")
    with pytest.raises(ValueError, match=r"bad_site.*'blocks.3.hook_mlp_out' is not a hook site"):
        evaluate([bad_site], w.tokens)
    no_site = _edited_export(w.sae_export, tmp_path / "no_site", hook_name="")
    with pytest.raises(ValueError, match="no_site.*no hook site"):
        evaluate([no_site], w.tokens)
    _, lm, tokens, ids = world
    with pytest.raises(ValueError, match=r"d_in 16 .* \[B, T, 64\]"):
        splice_pass(lm, [identity_sae(MLP_SITE, 16)], tokens, ids, batch_contexts=BATCH)
    with pytest.raises(ValueError, match="no SAEs"):
        splice_pass(lm, [], tokens, ids)


def test_resolve_lm_same_directory_spelled_differently(tiny_world):
    sae = load_sae(tiny_world.sae_export)
    twin = dataclasses.replace(sae, lm_path=str(tiny_world.lm) + "/.", name="twin")
    assert resolve_lm([sae, twin]) == sae.lm_path
