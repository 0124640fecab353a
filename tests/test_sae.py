"""SAE math against direct numpy computations of the paper's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saejax.sae import LossContext, get_family, make_sae
from saejax.sae.config import ReluConfig, SAEConfig, TopKConfig
from saejax.sae.decoder_norm import remove_parallel, unit_rows
from saejax.sae.init import geometric_median, input_scale


def relu_ctx(lam, warmup=0, step=0, target_l0=0.0, log_factor=0.0, scale_to_norm=1.0):
    return LossContext(step, {"l1_coefficient": jnp.float32(lam), "target_l0": jnp.float32(target_l0),
                              "l1_warmup_steps": jnp.float32(warmup)},
                       state={"log_l1_factor": jnp.float32(log_factor)},
                       scale_to_norm=jnp.float32(scale_to_norm))


def topk_ctx(dead, aux_coefficient=1 / 32):
    """Latents in `dead` have not fired for 1 step, with a window of 1 step (1 token)."""
    return LossContext(0, {"aux_coefficient": jnp.float32(aux_coefficient),
                           "dead_tokens_aux": jnp.float32(1)},
                       steps_since_fired=jnp.where(jnp.asarray(dead), 1, 0))


def _params(sae):
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.split(sae)[1]).items()}


def _randomize(sae, seed=0):
    """Give b_enc/b_dec nonzero values so the formulas are exercised fully."""
    rng = np.random.default_rng(seed)
    sae.b_enc[...] = jnp.asarray(rng.normal(size=sae.b_enc.shape) * 0.1, jnp.float32)
    sae.b_dec[...] = jnp.asarray(rng.normal(size=sae.b_dec.shape), jnp.float32)
    return sae


def test_relu_forward_and_loss_match_the_paper():
    cfg = SAEConfig(arch="relu", d_in=16, n_features=64, relu=ReluConfig(l1_coefficient=0.004))
    sae = _randomize(make_sae(cfg, seed=1))
    p = _params(sae)
    x = np.random.default_rng(2).normal(size=(32, 16)).astype(np.float32)
    f = np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    np.testing.assert_allclose(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.decode(jnp.asarray(f)), x_hat, rtol=1e-5, atol=1e-5)
    loss, aux = sae.loss(jnp.asarray(x), relu_ctx(0.004))
    expected = np.mean((x_hat - x) ** 2) + 0.004 * np.abs(f).sum(1).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["l0"], (f > 0).sum(1).mean(), rtol=1e-6)
    fvu = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    np.testing.assert_allclose(aux["fvu"], fvu, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-6)


def test_l1_weighted_by_decoder_norm():
    cfg = SAEConfig(arch="relu", d_in=8, n_features=32,
                    relu=ReluConfig(decoder_norm="l1_weighted", init_enc_from_dec=True))
    sae = make_sae(cfg, seed=0)
    sae.W_dec[...] = sae.W_dec[...] * jnp.linspace(0.1, 3.0, 32)[:, None]
    p = _params(sae)
    np.testing.assert_allclose(p["W_enc"], np.asarray(make_sae(cfg, seed=0).W_dec[...]).T)
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    _, aux = sae.loss(jnp.asarray(x), relu_ctx(1.0))
    f = np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
    weighted = (f * np.linalg.norm(p["W_dec"], axis=1)).sum(1).mean()
    np.testing.assert_allclose(aux["l1"], weighted, rtol=1e-5)
    # with a free decoder norm, nothing is projected or renormalised
    g = {"W_dec": jnp.ones_like(sae.W_dec[...])}
    assert sae.prepare_grads(p, g) is g
    assert sae.constrain(p) is p


def test_decoder_norm_helpers():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
    u = unit_rows(w)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-6)
    g_perp = remove_parallel(g, w)
    np.testing.assert_allclose(np.sum(np.asarray(g_perp) * np.asarray(u), axis=1), 0, atol=1e-6)
    # the removed part is parallel to the row: g - g_perp = c * u
    diff = np.asarray(g - g_perp)
    cos = np.sum(diff * np.asarray(u), 1) / np.linalg.norm(diff, axis=1)
    np.testing.assert_allclose(np.abs(cos), 1.0, rtol=1e-5)


def test_geometric_median_weiszfeld():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 5)).astype(np.float32)
    x[:20] += 200.0  # outliers pull the mean but barely move the median
    y = np.asarray(geometric_median(jnp.asarray(x)))
    # optimality: the unit vectors from y to the points sum to ~0
    d = x - y
    grad = (d / np.linalg.norm(d, axis=1, keepdims=True)).sum(0)
    assert np.linalg.norm(grad) < 1e-2 * len(x)
    assert np.linalg.norm(y) < 1.0 < np.linalg.norm(x.mean(0))
    # and it beats the mean and small perturbations on the objective
    obj = lambda c: np.linalg.norm(x - c, axis=1).sum()
    assert obj(y) <= obj(x.mean(0))
    for e in np.eye(5) * 0.01:
        assert obj(y) <= obj(y + e) + 1e-3 and obj(y) <= obj(y - e) + 1e-3


def test_input_scale_gives_mean_squared_norm_d():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 12)) * 7.0, jnp.float32)
    s = input_scale(x)
    np.testing.assert_allclose(jnp.mean(jnp.sum((s * x) ** 2, axis=1)), 12.0, rtol=1e-5)


def test_topk_forward_and_auxk():
    cfg = SAEConfig(arch="topk", d_in=8, n_features=64, topk=TopKConfig(k=4, k_aux=8))
    sae = _randomize(make_sae(cfg, seed=3))
    p = _params(sae)
    np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)  # W_enc = W_decᵀ at init
    x = np.random.default_rng(4).normal(size=(16, 8)).astype(np.float32)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    kth = np.sort(pre, axis=1)[:, -4][:, None]
    f = np.where(pre >= kth, np.maximum(pre, 0), 0)
    np.testing.assert_allclose(sae.encode(jnp.asarray(x)), f, rtol=1e-5, atol=1e-6)
    assert (np.asarray(sae.encode(jnp.asarray(x))) > 0).sum(1).max() <= 4

    x_hat = f @ p["W_dec"] + p["b_dec"]
    no_dead = jnp.zeros(64, bool)
    loss, aux = sae.loss(jnp.asarray(x), topk_ctx(no_dead))
    np.testing.assert_allclose(loss, np.mean((x_hat - x) ** 2), rtol=1e-5)
    assert float(aux["aux_loss"]) == 0.0

    dead = np.zeros(64, bool)
    dead[::2] = True  # 32 dead latents; AuxK uses the top 8 of them
    loss, aux = sae.loss(jnp.asarray(x), topk_ctx(dead))
    masked = np.where(dead, pre, -np.inf)
    kth_aux = np.sort(masked, axis=1)[:, -8][:, None]
    z_aux = np.where((masked >= kth_aux) & dead, np.maximum(pre, 0), 0)
    e_hat = z_aux @ p["W_dec"]
    expected_aux = np.mean((e_hat - (x - x_hat)) ** 2)
    np.testing.assert_allclose(aux["aux_loss"], expected_aux, rtol=1e-4)
    np.testing.assert_allclose(loss, np.mean((x_hat - x) ** 2) + expected_aux / 32, rtol=1e-5)


def test_topk_aux_gradient_reaches_only_dead_latents():
    cfg = SAEConfig(arch="topk", d_in=8, n_features=32, topk=TopKConfig(k=2, k_aux=4))
    sae = make_sae(cfg, seed=0)
    graphdef, state = nnx.split(sae)
    params = nnx.to_pure_dict(state)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)
    dead = jnp.arange(32) >= 16

    def aux_only(p):
        m = nnx.merge(graphdef, p)
        return m.loss(x, topk_ctx(dead))[1]["aux_loss"]

    g = jax.grad(aux_only)(params)
    assert np.abs(np.asarray(g["W_enc"])[:, :16]).max() == 0.0
    assert np.abs(np.asarray(g["W_enc"])[:, 16:]).max() > 0.0


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_gradients_equal_the_plain_formula(arch):
    """pre_activations routes b_dec's encoder gradient through a matvec (no sixth matmul); the
    gradients of every parameter must equal autodiff of the plain (x - b_dec) @ W_enc + b_enc."""
    cfg = SAEConfig(arch=arch, d_in=16, n_features=64, relu=ReluConfig(l1_coefficient=0.01),
                    topk=TopKConfig(k=8, k_aux=8))
    sae = _randomize(make_sae(cfg, seed=3))
    graphdef, params = nnx.split(sae)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(32, 16)), jnp.float32)
    family = get_family(arch)
    ctx = LossContext(0, {k: jnp.float32(v) for k, v in family.hparams(cfg, 100, 32).items()},
                      steps_since_fired=jnp.where(jnp.arange(64) % 3 == 0, 10**8, 0),
                      state=family.init_state(cfg))

    def loss(params, plain):
        m = nnx.merge(graphdef, params)
        if plain:
            m.pre_activations = lambda x: (x - m.b_dec[...]) @ m.W_enc[...] + m.b_enc[...]
        return m.loss(x, ctx)[0]

    fast, plain = (nnx.to_pure_dict(jax.grad(loss)(params, p)) for p in (False, True))
    for k in plain:
        np.testing.assert_allclose(fast[k], plain[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert np.abs(plain["b_dec"]).max() > 1e-3  # the bias gradient is exercised


def test_l1_warmup_ramps_lambda_from_the_hparams():
    """λ_t = λ·min(1, (t+1)/w) with w carried as data; w = 0 is no warm-up."""
    cfg = SAEConfig(arch="relu", d_in=8, n_features=16)
    sae = make_sae(cfg, seed=0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)
    mse = float(sae.loss(x, relu_ctx(0.0))[1]["mse"])
    l1 = float(sae.loss(x, relu_ctx(0.0))[1]["l1"])
    for warm, step, factor in [(0, 0, 1.0), (10, 0, 0.1), (10, 4, 0.5), (10, 50, 1.0)]:
        loss = float(sae.loss(x, relu_ctx(2.0, warm, step))[0])
        np.testing.assert_allclose(loss, mse + 2.0 * factor * l1, rtol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_fired_is_the_modules_method(arch):
    """Firing is asked of the family's module (a family may override it)."""
    cfg = SAEConfig(arch=arch, d_in=8, n_features=16, topk=TopKConfig(k=2, k_aux=2))
    sae = make_sae(cfg, seed=0)
    f = jnp.asarray([[0.0, 1.0, -1.0]])
    np.testing.assert_array_equal(sae.fired(f), [[False, True, False]])


def test_lambda_is_defined_on_normalised_inputs():
    """An SAE on raw inputs x with norm scale s (E||s·x||² = d) has the loss of the same SAE on
    s·x (its parameters scaled to match) divided by s²: λ means the same either way."""
    s = 4.0
    cfg = SAEConfig(arch="relu", d_in=8, n_features=16)
    raw = _randomize(make_sae(cfg, seed=0))
    norm = make_sae(cfg, seed=0)
    p = _params(raw)
    norm.W_enc[...], norm.b_enc[...] = jnp.asarray(p["W_enc"]), jnp.asarray(p["b_enc"] * s)
    norm.W_dec[...], norm.b_dec[...] = jnp.asarray(p["W_dec"]), jnp.asarray(p["b_dec"] * s)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)
    loss_raw = raw.loss(x, relu_ctx(0.3, scale_to_norm=s))[0]
    loss_norm = norm.loss(x * s, relu_ctx(0.3))[0]
    np.testing.assert_allclose(loss_raw * s**2, loss_norm, rtol=1e-5)


def test_target_l0_moves_lambda_towards_the_target():
    cfg = SAEConfig(arch="relu", d_in=8, n_features=64)
    sae = make_sae(cfg, seed=0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.float32)
    l0 = float(sae.loss(x, relu_ctx(1e-3))[1]["l0"])
    up = sae.loss(x, relu_ctx(1e-3, target_l0=l0 / 4))[1]["state"]["log_l1_factor"]
    down = sae.loss(x, relu_ctx(1e-3, target_l0=l0 * 4))[1]["state"]["log_l1_factor"]
    off = sae.loss(x, relu_ctx(1e-3))[1]["state"]["log_l1_factor"]
    warming = sae.loss(x, relu_ctx(1e-3, warmup=10, step=3, target_l0=l0 / 4))[1]["state"]
    assert float(up) > 0 > float(down) and float(off) == 0.0
    assert float(warming["log_l1_factor"]) == 0.0  # frozen during the λ warm-up
    # the factor scales λ
    a = sae.loss(x, relu_ctx(1e-3, log_factor=np.log(2.0)))[1]["l1_coefficient"]
    np.testing.assert_allclose(a, 2e-3, rtol=1e-5)
