"""The Gated family against a hand-worked case, the paper's equations (float64 numpy,
tests/ref_jumprelu_gated.py), SAELens's GatedTrainingSAE, and SAELens loading its export.

Units as in tests/test_family_jumprelu.py: with x_paper = x / √d_in and biases / √d_in (weights and
r_mag unchanged) saejax's loss equals the paper's summed-squared-error loss for the same λ.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ref_jumprelu_gated as ref
from test_family_jumprelu import assert_export_matches_saelens
from saejax.config import load_config
from saejax.errors import ConfigError
from saejax.sae import LossContext, get_family
from saejax.sae.config import SAEConfig
from saejax.sae.decoder_norm import remove_parallel
from saejax.train.loop import train

D, F, B = 16, 64, 64
FAMILY = get_family("gated")
CFG = SAEConfig(arch="gated", d_in=D, n_features=F)
BIASES = ("b_gate", "b_mag", "b_dec")


def ctx(lam, scale_to_norm=1.0):
    h = {"l1_coefficient": lam, "target_l0": 0.0, "l1_warmup_steps": 0.0}
    return LossContext(step=10, hparams={k: jnp.float32(v) for k, v in h.items()},
                       state={"log_l1_factor": jnp.zeros((), jnp.float32)},
                       scale_to_norm=scale_to_norm)


def loss_and_grads(params, x, context, cfg=CFG):
    graphdef = FAMILY.graphdef(cfg)
    fn = lambda p: nnx.merge(graphdef, p).loss(jnp.asarray(x), context)  # noqa: E731
    (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(params)
    return float(loss), aux, {k: np.asarray(v) for k, v in grads.items()}


def close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol,
                               atol=rtol * max(np.abs(expected).max(), 1e-30))


def random_case(seed):
    """float32 parameters in saejax's units, unit decoder rows, no pre-activation within float32
    reach of 0 (where the gate or a ReLU switches): the first such draw from `seed` on."""
    while True:
        p, x = _draw(np.random.default_rng(seed))
        want = paper(p, x, 0.0)
        if min(np.abs(want[name]).min() for name in ("pi_gate", "pi_mag")) > 1e-4:
            return p, x
        seed += 1000


def _draw(rng):
    w_dec = rng.normal(size=(F, D))
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    p = {"W_enc": w_dec.T + 0.3 * rng.normal(size=(D, F)), "b_gate": rng.normal(size=F),
         "r_mag": 0.3 * rng.normal(size=F), "b_mag": rng.normal(size=F), "W_dec": w_dec,
         "b_dec": 0.2 * rng.normal(size=D)}
    p = {k: np.asarray(v, np.float32) for k, v in p.items()}
    return p, rng.normal(size=(B, D)).astype(np.float32)


def paper(p, x, lam, **variant):
    r = math.sqrt(D)
    f64 = {k: np.asarray(v, np.float64) / (r if k in BIASES else 1) for k, v in p.items()}
    return ref.gated(np.asarray(x, np.float64) / r, f64["W_enc"], f64["b_gate"], f64["r_mag"],
                     f64["b_mag"], f64["W_dec"], f64["b_dec"], lam, **variant)


def in_paper_units(grads):
    r = math.sqrt(D)
    return {k: v * (r if k in BIASES else 1) for k, v in grads.items()}


def test_hand_worked_case():
    """d_in = 2, 4 features reading x_0: W_gate = [1, 1, −1, 1], b_gate = [0, 0, 0, −5]
    (feature 3's gate is shut), r_mag = [0, log 2, 0, 0], b_mag = [0, −1, 0, 0]; b_dec = 0."""
    w_dec = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
    params = {"W_enc": jnp.asarray(np.array([[1, 1, -1, 1], [0, 0, 0, 0]], np.float32)),
              "b_gate": jnp.asarray([0, 0, 0, -5.0]), "r_mag": jnp.asarray([0, math.log(2), 0, 0]),
              "b_mag": jnp.asarray([0, -1.0, 0, 0]), "W_dec": jnp.asarray(w_dec),
              "b_dec": jnp.zeros(2)}
    cfg = SAEConfig(arch="gated", d_in=2, n_features=4)
    x = np.array([[3.0, 1.0]], np.float32)
    sae = nnx.merge(FAMILY.graphdef(cfg), params)
    # π_gate = [3, 3, −3, −2]; π_mag = [3, 2·3 − 1, −3, 3]: f = [3, 5, 0, 0]
    np.testing.assert_allclose(np.asarray(sae.encode(jnp.asarray(x))), [[3, 5, 0, 0]])
    loss, aux, g = loss_and_grads(params, x, ctx(0.5), cfg)
    # x̂ = [8, 0]: squared error (25 + 1)/2 = 13; L1 = ReLU(π_gate)·1 = 6, × λ/√2;
    # auxiliary x̂ = [3 + 3, 0] from the gate's ReLU: (9 + 1)/2 = 5
    np.testing.assert_allclose(float(aux["mse"]), 13)
    np.testing.assert_allclose(float(aux["l1"]), 6)
    np.testing.assert_allclose(float(aux["aux_loss"]), 5)
    np.testing.assert_allclose(loss, 13 + 0.5 / math.sqrt(2) * 6 + 5, rtol=1e-6)
    # The frozen decoder: W_dec's gradient is the reconstruction's alone, dx̂ = err = [5, −1]
    # times f: rows 0, 1 get 3·[5, −1] and 5·[5, −1] (+ the norm weight's parallel part λ/√2·a)
    grad_w_dec = np.asarray(remove_parallel(jnp.asarray(g["W_dec"]), jnp.asarray(w_dec)))
    np.testing.assert_allclose(grad_w_dec, [[0, -3], [0, -5], [0, 0], [0, 0]], atol=1e-6)
    # r_mag: features 0 and 1 are on: dL/dπ_mag = err·W_dec,i = 5, × W_mag,i x̄ = 3 and 6
    np.testing.assert_allclose(g["r_mag"], [15, 30, 0, 0], atol=1e-5)
    # b_gate: λ/√2 on the open gates, + the auxiliary error [3, −1]·W_decᵀ = 3 on features 0, 1
    np.testing.assert_allclose(g["b_gate"], [0.5 / math.sqrt(2) + 3] * 2 + [0, 0], rtol=1e-6)


def test_matches_the_papers_equations():
    """Loss terms, codes and every gradient; W_dec's up to the component parallel to each row,
    which the step removes (the paper's decoder is unit-norm; saejax's L1 weight ‖W_dec,i‖ = 1
    there adds only such a component)."""
    lam = 0.7
    p, x = random_case(0)
    loss, aux, g = loss_and_grads(p, x, ctx(lam))
    want = paper(p, x, lam)
    close(loss, want["loss"])
    for ours, theirs in (("mse", "mse"), ("aux_loss", "aux")):
        close(float(aux[ours]), want[theirs])
    close(float(aux["l1"]) / math.sqrt(D), want["l1"])
    sae = nnx.merge(FAMILY.graphdef(CFG), p)
    close(np.asarray(sae.encode(jnp.asarray(x))) / math.sqrt(D), want["f"])
    got = in_paper_units(g)
    w = jnp.asarray(p["W_dec"])
    got["W_dec"] = np.asarray(remove_parallel(jnp.asarray(got["W_dec"]), w))
    want["grads"]["W_dec"] = np.asarray(remove_parallel(jnp.asarray(want["grads"]["W_dec"]), w))
    for name, value in want["grads"].items():
        assert np.abs(value).max() > 0, name
        close(got[name], value)


def test_unscaled_inputs_give_the_same_training():
    lam, s = 0.7, 3.0
    p, x = random_case(0)
    raw = {k: v / s if k in BIASES else v for k, v in p.items()}
    loss, _, g = loss_and_grads(p, x, ctx(lam))
    loss_raw, aux_raw, g_raw = loss_and_grads(raw, x / s, ctx(lam, s))
    close(loss_raw * s * s, loss)
    close(float(aux_raw["l1_coefficient"]), lam)  # reported in the paper's units
    for name in ("W_enc", "W_dec", "r_mag"):
        close(g_raw[name] * s * s, g[name])


def test_matches_saelens_training_class():
    """SAELens's GatedTrainingSAE with the same weights and batch in the paper's units: the same
    loss terms and gradients, except that SAELens's auxiliary reconstruction goes through the
    live decoder (the paper's is a frozen copy), so its W_dec and b_dec gradients carry that
    term's gradient too: exactly the difference of the two transcriptions."""
    torch = pytest.importorskip("torch")
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    lam = 0.7
    p, x = random_case(1)
    loss, aux, g = loss_and_grads(p, x, ctx(lam))
    r = math.sqrt(D)
    sae = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D, d_sae=F, l1_coefficient=lam))
    with torch.no_grad():
        for name, value in p.items():
            scaled = np.asarray(value, np.float64) / (r if name in BIASES else 1)
            getattr(sae, name).copy_(torch.tensor(scaled, dtype=torch.float32))
    out = sae.training_forward_pass(TrainStepInput(
        sae_in=torch.tensor(x / r, dtype=torch.float32), coefficients={"l1": lam},
        dead_neuron_mask=None, n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    theirs = {k: float(v.detach()) for k, v in out.losses.items()}
    close(theirs["mse_loss"], float(aux["mse"]))
    close(theirs["l1_loss"], lam * float(aux["l1"]) / r)
    close(theirs["auxiliary_reconstruction_loss"], float(aux["aux_loss"]))
    close(float(out.loss.detach()), loss)
    live = paper(p, x, lam, frozen=False, norm_weighted=True)["grads"]
    frozen = paper(p, x, lam, frozen=True, norm_weighted=True)["grads"]
    got = in_paper_units(g)
    for name in p:
        saelens = getattr(sae, name).grad.numpy().astype(np.float64)
        close(got[name] + live[name] - frozen[name], saelens, rtol=2e-5)
    assert np.abs(live["W_dec"] - frozen["W_dec"]).max() > 1e-3  # the difference is real


def test_resample_rule():
    p = {k: jnp.asarray(v) for k, v in random_case(0)[0].items()}
    dead = jnp.arange(F) % 4 == 0
    unit = jnp.ones((F, D)) / math.sqrt(D)
    new, masks = FAMILY.resample(p, dead, unit, jnp.float32(0.5))
    assert set(new) == set(masks) == set(p)
    for name in ("b_gate", "b_mag", "r_mag"):
        np.testing.assert_array_equal(new[name], np.where(dead, 0, p[name]))
    np.testing.assert_allclose(new["W_enc"][:, 0], 0.5 / math.sqrt(D), rtol=1e-6)
    np.testing.assert_array_equal(new["W_enc"][:, 1], p["W_enc"][:, 1])


def test_bad_settings_name_the_field():
    for overrides, field in ((["sae.gated.target_l0=64"], "sae.gated.target_l0"),
                             (["sae.gated.l1_coefficient=0"], "sae.gated.l1_coefficient"),
                             (["sae.gated.l1_warmup_fraction=2"], "sae.gated.l1_warmup_fraction")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, ["sae.arch=gated", "sae.n_features=64", *overrides])
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        FAMILY.from_saelens({"apply_b_dec_to_input": False})


@pytest.mark.slow  # tests/test_families.py covers it for every family
def test_export_loads_in_saelens_and_encodes_the_same(tmp_path):
    """A tiny trained run (inputs scaled, dead features resampled at 25/50/75%) exported, loaded
    by SAELens itself and by saejax: the same codes and reconstructions."""
    cfg = load_config(None, [
        "sae.arch=gated", f"sae.d_in={D}", f"sae.n_features={F}", "data.n_true_features=32",
        "data.p_active=0.05", f"train.batch_size={B}", "train.steps=20", "train.log_every=10",
        "train.checkpoint_every=20", "optim.lr=1e-2", f"train.run_dir={tmp_path / 'run'}",
        "train.progress=false", "train.async_checkpointing=false"])
    summary = train(cfg, quiet=True)
    assert np.isfinite(summary["fvu"])
    assert_export_matches_saelens(tmp_path / "run", "gated")
