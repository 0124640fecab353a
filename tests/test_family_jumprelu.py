"""The JumpReLU family against a hand-worked case, the paper's equations (float64 numpy,
tests/ref_jumprelu_gated.py), SAELens's JumpReLUTrainingSAE, and SAELens loading its export.

Units: saejax's inputs have mean squared norm d_in and its "mse" is a mean over elements; the
paper's (and SAELens's) loss sums the squared error over d_in on inputs at unit mean squared
norm. With x_paper = x / √d_in, biases and θ / √d_in (W_enc, W_dec unchanged), the two losses are
the same number for the same λ, and ε in the config is the paper's: that is what these tests
check, so a λ, θ₀ or ε from the paper means the same here.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ref_jumprelu_gated as ref
from saejax.config import load_config
from saejax.errors import ConfigError
from saejax.eval.trained import load_sae
from saejax.export import export_run
from saejax.runs import load_params
from saejax.sae import LossContext, get_family
from saejax.sae.config import JumpReLUConfig, SAEConfig
from saejax.train.loop import train

D, F, B = 16, 64, 64
FAMILY = get_family("jumprelu")


def ctx(lam, eps, scale_to_norm=1.0):
    """A fixed λ (no warm-up, no target) and bandwidth ε in the paper's units."""
    h = {"l0_coefficient": lam, "target_l0": 0.0, "l0_warmup_steps": 0.0, "bandwidth": eps}
    return LossContext(step=10, hparams={k: jnp.float32(v) for k, v in h.items()},
                       state={"log_l0_factor": jnp.zeros((), jnp.float32)},
                       scale_to_norm=scale_to_norm)


def loss_and_grads(cfg, params, x, context):
    graphdef = FAMILY.graphdef(cfg)
    fn = lambda p: nnx.merge(graphdef, p).loss(jnp.asarray(x), context)  # noqa: E731
    (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(params)
    return float(loss), aux, {k: np.asarray(v) for k, v in grads.items()}


def close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol,
                               atol=rtol * max(np.abs(expected).max(), 1e-30))


def random_case(seed, eps_paper, apply_b_dec):
    """float32 parameters in saejax's units (unit decoder rows, inputs at mean squared norm
    d_in), with no pre-activation within float32 reach of θ or of the kernel's edges."""
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(F, D))
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    p = {"W_enc": w_dec.T + 0.3 * rng.normal(size=(D, F)), "b_enc": 0.3 * rng.normal(size=F),
         "W_dec": w_dec, "b_dec": 0.2 * rng.normal(size=D),
         "log_threshold": np.log(rng.uniform(0.5, 1.5, size=F))}
    p = {k: np.asarray(v, np.float32) for k, v in p.items()}
    x = rng.normal(size=(B, D)).astype(np.float32)
    z = ((x - p["b_dec"]) if apply_b_dec else x).astype(np.float64) @ p["W_enc"] + p["b_enc"]
    u = (z - np.exp(p["log_threshold"].astype(np.float64))) / (eps_paper * math.sqrt(D))
    assert np.abs(u).min() > 1e-4 and np.abs(np.abs(u) - 0.5).min() > 1e-4, "re-pick the seed"
    assert 0.05 < (np.abs(u) < 0.5).mean() < 0.6  # many entries inside the kernel's window
    return p, x


def to_paper(p, x):
    """(x, W_enc, b_enc, W_dec, b_dec, θ) in the paper's units, float64."""
    r = math.sqrt(D)
    f64 = {k: np.asarray(v, np.float64) for k, v in p.items()}
    return (np.asarray(x, np.float64) / r, f64["W_enc"], f64["b_enc"] / r, f64["W_dec"],
            f64["b_dec"] / r, np.exp(f64["log_threshold"]) / r)


def saejax_grads_in_paper_units(grads, theta_paper):
    """What the paper's gradients are, from saejax's: biases ×√d, and d/dθ = (d/d log θ) / θ."""
    r = math.sqrt(D)
    return {"W_enc": grads["W_enc"], "b_enc": grads["b_enc"] * r, "W_dec": grads["W_dec"],
            "b_dec": grads["b_dec"] * r, "theta": grads["log_threshold"] / theta_paper}


def cfg_for(apply_b_dec, d=D, f=F):
    return SAEConfig(arch="jumprelu", d_in=d, n_features=f,
                     jumprelu=JumpReLUConfig(apply_b_dec_to_input=apply_b_dec))


def test_hand_worked_case():
    """d_in = 4 (√d = 2), 3 features, θ = 1, ε = 0.5 (→ 1 in saejax units: window z ∈ (0.5,
    1.5)), λ = 0.1; every number below is worked out by hand from the paper's equations."""
    eye = np.eye(3, 4, dtype=np.float32)
    params = {"W_enc": jnp.asarray(eye.T), "b_enc": jnp.zeros(3), "W_dec": jnp.asarray(eye),
              "b_dec": jnp.asarray([0.1, 0, 0, 0], jnp.float32), "log_threshold": jnp.zeros(3)}
    x = np.array([[2.0, 0.8, 1.2, 0], [0.3, 1.0, -1.0, 0]], np.float32)
    loss, aux, g = loss_and_grads(cfg_for(False, 4, 3), params, x, ctx(0.1, 0.5))
    # f = [[2, 0, 1.2], [0, 0, 0]] (z = θ exactly does not fire); L0 = 1
    np.testing.assert_allclose(float(aux["l0"]), 1.0)
    # squared errors (0.01 + 0.64) + (0.04 + 1 + 1) over 8 elements, + λ·L0
    np.testing.assert_allclose(loss, 2.69 / 8 + 0.1, rtol=1e-6)
    # dL/dx̂ = 2·err/8. dθ through f: −(θ/ε)·dL/df on the entries in the window (feature 1,
    # rows 0 and 1: dL/df = −0.2, −0.25); through L0: −λ/(ε·B) = −0.05 per entry in the window
    # (feature 1 twice, feature 2 once, at z = 1.2). θ = 1, so d/d log θ is the same.
    np.testing.assert_allclose(g["log_threshold"], [0.0, 0.45 - 0.1, -0.05], atol=1e-7)
    # dz = dL/df where f fires: only feature 0 of row 0 has an error there (0.1/4)
    np.testing.assert_allclose(g["b_enc"], [0.025, 0, 0], atol=1e-7)
    np.testing.assert_allclose(g["W_enc"][:, 0], 0.025 * x[0], atol=1e-7)
    np.testing.assert_allclose(g["W_dec"][1], 0, atol=0)  # feature 1 never fires


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_matches_the_papers_equations(apply_b_dec):
    eps, lam = 0.1, 0.05
    p, x = random_case(0, eps, apply_b_dec)
    loss, aux, g = loss_and_grads(cfg_for(apply_b_dec), p, x, ctx(lam, eps))
    xp, W_enc, b_enc, W_dec, b_dec, theta = to_paper(p, x)
    want = ref.jumprelu(xp, W_enc, b_enc, W_dec, b_dec, theta, lam, eps, apply_b_dec)
    close(loss, want["loss"])
    close(float(aux["mse"]), want["mse"])
    close(float(aux["sparsity_loss"]), want["sparsity"])
    sae = nnx.merge(FAMILY.graphdef(cfg_for(apply_b_dec)), p)
    close(np.asarray(sae.encode(jnp.asarray(x))) / math.sqrt(D), want["f"])
    got = saejax_grads_in_paper_units(g, theta)
    for name, value in want["grads"].items():
        assert np.abs(value).max() > 0, name
        close(got[name], value)


def test_unscaled_inputs_give_the_same_training():
    """Raw inputs x/s (sae.scale_inputs=false, scale_to_norm = s) with θ, biases and ε in raw
    units: the loss is the normalised one / s², so every gradient of log θ and W is too."""
    eps, lam, s = 0.1, 0.05, 3.0
    p, x = random_case(0, eps, True)
    raw = {**p, "b_enc": p["b_enc"] / s, "b_dec": p["b_dec"] / s,
           "log_threshold": p["log_threshold"] - np.float32(math.log(s))}
    loss, _, g = loss_and_grads(cfg_for(True), p, x, ctx(lam, eps))
    loss_raw, aux_raw, g_raw = loss_and_grads(cfg_for(True), raw, x / s, ctx(lam, eps, s))
    close(loss_raw * s * s, loss)
    close(float(aux_raw["l0_coefficient"]), lam)  # reported in the paper's units
    for name in ("W_enc", "W_dec", "log_threshold"):
        close(g_raw[name] * s * s, g[name])


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_matches_saelens_training_class(apply_b_dec):
    """SAELens's JumpReLUTrainingSAE ("step" L0, STE to θ only) with the same weights and batch
    in the paper's units. SAELens differs from the paper in parametrising θ itself (its
    gradient is saejax's d/d log θ divided by θ) and in its defaults, not in the loss."""
    torch = pytest.importorskip("torch")
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    eps, lam = 0.1, 0.05
    p, x = random_case(1, eps, apply_b_dec)
    loss, aux, g = loss_and_grads(cfg_for(apply_b_dec), p, x, ctx(lam, eps))
    xp, W_enc, b_enc, W_dec, b_dec, theta = to_paper(p, x)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D, d_sae=F, jumprelu_bandwidth=eps, l0_coefficient=lam,
        apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec),
                            ("b_dec", b_dec), ("threshold", theta)):
            getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))
    out = sae.training_forward_pass(TrainStepInput(
        sae_in=torch.tensor(xp, dtype=torch.float32), coefficients={"l0": lam},
        dead_neuron_mask=None, n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    close(float(out.losses["mse_loss"]), float(aux["mse"]))
    close(float(out.losses["l0_loss"]), float(aux["sparsity_loss"]))
    close(float(out.loss), loss)
    got = saejax_grads_in_paper_units(g, theta)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        ours = got["theta" if name == "threshold" else name]
        close(ours, getattr(sae, name).grad.numpy().astype(np.float64), rtol=2e-5)


def test_saelens_tensor_mapping():
    log_t = np.log(np.array([0.5, 2.0], np.float32))
    out = FAMILY.to_saelens({"W_enc": 1, "log_threshold": log_t})
    assert set(out) == {"W_enc", "threshold"}
    np.testing.assert_allclose(out["threshold"], [0.5, 2.0], rtol=1e-6)
    back = FAMILY.from_saelens_tensors({"W_enc": 1, "threshold": np.array([0.5, 0.0, -1.0])})
    np.testing.assert_allclose(np.exp(back["log_threshold"]), [0.5, 0.0, 0.0], rtol=1e-6)
    assert FAMILY.from_saelens({"apply_b_dec_to_input": False}) == {
        "jumprelu": {"apply_b_dec_to_input": False}}


def test_bad_settings_name_the_field():
    for overrides, field in ((["sae.jumprelu.target_l0=64"], "sae.jumprelu.target_l0"),
                             (["sae.jumprelu.l0_coefficient=0"], "sae.jumprelu.l0_coefficient"),
                             (["sae.jumprelu.bandwidth=0"], "sae.jumprelu.bandwidth"),
                             (["sae.jumprelu.threshold_init=-1"], "sae.jumprelu.threshold_init")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, ["sae.arch=jumprelu", "sae.n_features=64", *overrides])


def _run_cfg(run_dir, apply_b_dec):
    return load_config(None, [
        "sae.arch=jumprelu", f"sae.d_in={D}", f"sae.n_features={F}",
        f"sae.jumprelu.apply_b_dec_to_input={str(apply_b_dec).lower()}",
        "sae.jumprelu.threshold_init=0.05", "sae.jumprelu.bandwidth=0.05",
        "data.n_true_features=32", "data.p_active=0.05", f"train.batch_size={B}",
        "train.steps=20", "train.log_every=10", "train.checkpoint_every=20", "optim.lr=1e-2",
        f"train.run_dir={run_dir}", "train.progress=false", "train.async_checkpointing=false"])


def assert_fold_is_exact(run_dir, x, f_run):
    """The parameters folded for raw inputs (run and export) code raw x as the trained ones
    code s·x, and reconstruct x̂/s: the fold leaves the pre-activation units alone."""
    run = load_params(run_dir)
    assert run.input_scale != 1.0
    trained = nnx.merge(get_family(run.cfg.sae.arch).graphdef(run.cfg.sae), run.params)
    f_trained = np.asarray(trained.encode(jnp.asarray(x) * run.input_scale))
    np.testing.assert_allclose(f_trained, f_run, rtol=1e-5, atol=1e-5)
    load = load_sae(run_dir)
    np.testing.assert_allclose(np.asarray(trained.decode(jnp.asarray(f_run))) / run.input_scale,
                               np.asarray(load.decode(load.params, jnp.asarray(f_run))),
                               rtol=1e-5, atol=1e-5)


def assert_export_matches_saelens(run_dir, arch: str):
    """Export the run; SAELens loads the folder as `arch` and codes and reconstructs random
    inputs as saejax does, on the run and on the folder. Returns (SAELens SAE, x, codes)."""
    torch = pytest.importorskip("torch")
    sae_lens = pytest.importorskip("sae_lens")
    out = export_run(run_dir, run_dir.parent / "export")
    theirs = sae_lens.SAE.load_from_disk(str(out))
    assert theirs.cfg.architecture() == arch
    run_sae, exported = load_sae(run_dir), load_sae(out)
    assert exported.arch == run_sae.arch == arch
    x = np.random.default_rng(0).normal(size=(32, run_sae.d_in)).astype(np.float32) * 3
    f_run = np.asarray(run_sae.encode(run_sae.params, jnp.asarray(x)))
    assert (f_run > 0).any() and (f_run == 0).any()
    with torch.no_grad():
        f_theirs = theirs.encode(torch.from_numpy(x))
        x_hat_theirs = theirs.decode(f_theirs).numpy()
    np.testing.assert_allclose(f_theirs.numpy(), f_run, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(exported.encode(exported.params, jnp.asarray(x))),
                               f_run, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat_theirs, np.asarray(run_sae.decode(run_sae.params, f_run)),
                               rtol=1e-5, atol=1e-5)
    assert_fold_is_exact(run_dir, x, f_run)
    return theirs, x, f_run


@pytest.mark.slow  # tests/test_families.py covers it for every family
def test_export_loads_in_saelens_and_encodes_the_same(tmp_path):
    """A tiny trained run (the paper's form: no pre-encoder bias, inputs scaled, so the fold is
    exercised) exported, loaded by SAELens itself and by saejax; and a folder SAELens saved
    (with its default pre-encoder bias) loaded by saejax."""
    torch = pytest.importorskip("torch")
    summary = train(_run_cfg(tmp_path / "run", False), quiet=True)
    assert np.isfinite(summary["fvu"])
    theirs, x, f_run = assert_export_matches_saelens(tmp_path / "run", "jumprelu")
    assert not theirs.cfg.apply_b_dec_to_input

    # SAELens's own folder, b_dec subtracted (its default): saejax reads the option and θ
    theirs.cfg.apply_b_dec_to_input = True
    with torch.no_grad():
        theirs.b_dec.copy_(torch.randn(D))
        f_theirs = theirs.encode(torch.from_numpy(x)).numpy()
    theirs.save_model(str(tmp_path / "saelens_saved"))
    loaded = load_sae(tmp_path / "saelens_saved")
    assert loaded.arch == "jumprelu" and loaded.cfg.jumprelu.apply_b_dec_to_input
    np.testing.assert_allclose(np.asarray(loaded.encode(loaded.params, jnp.asarray(x))),
                               f_theirs, rtol=1e-5, atol=1e-5)
