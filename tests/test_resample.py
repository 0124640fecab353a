"""Each rule of the paper's dead-feature resampling, on crafted states and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saejax.config import Config
from saejax.sharding import make_mesh
from saejax.train.resample import resample
from saejax.train.step import StepContract

D, F, STEP, WINDOW = 4, 16, 100, 10
DEAD = np.zeros(F, bool)
DEAD[[1, 5, 6, 12]] = True


def _contract(model_axis=2):
    cfg = Config()
    cfg.sae.d_in, cfg.sae.n_features = D, F
    cfg.sae.relu.l1_coefficient = 0.0
    cfg.resample.window_steps = WINDOW
    cfg.mesh.data, cfg.mesh.model = 8 // model_axis, model_axis
    return StepContract.build(cfg, make_mesh(cfg.mesh))


def _crafted_state(contract):
    """A state at STEP where exactly the DEAD features have not fired in WINDOW steps, with
    encoder norms known and every Adam moment set to 1 (so resets are visible)."""
    state = contract.init(None)
    rng = np.random.default_rng(0)
    enc_norms = rng.uniform(0.5, 2.0, F).astype(np.float32)
    w_enc = rng.normal(size=(D, F)).astype(np.float32)
    w_enc *= enc_norms / np.linalg.norm(w_enc, axis=0)
    ones = optax.tree_map_params(contract.tx, jnp.ones_like, state.opt_state,
                                 transform_non_params=lambda v: v)
    state = state.replace(
        step=jnp.asarray(STEP, jnp.int32),
        params={**state.params, "W_enc": jnp.asarray(w_enc),
                "b_enc": jnp.full((F,), 0.3, jnp.float32)},
        opt_state=ones,
        last_fired=jnp.asarray(np.where(DEAD, STEP - WINDOW, STEP - WINDOW + 1), jnp.int32),
    )
    return jax.device_put(state, contract.state_shardings), enc_norms


def _inputs(contract, rows):
    return jax.device_put(jnp.asarray(rows, jnp.float32), contract.batch_sharding)


@pytest.mark.parametrize("model_axis", [1, 2, 8])
def test_each_rule(model_axis):
    contract = _contract(model_axis)
    state, enc_norms = _crafted_state(contract)
    before = jax.device_get(state)
    # One input reconstructs terribly, the rest perfectly (zero params decode to b_dec = 0):
    # all the probability mass (∝ loss²) is on row 3.
    rows = np.zeros((16, D), np.float32)
    rows[3] = [3.0, 0.0, 4.0, 0.0]
    new, n = resample(contract, state, [_inputs(contract, rows)])
    new = jax.device_get(new)
    assert int(n) == DEAD.sum()
    p, p0 = new.params, before.params
    unit = rows[3] / 5.0
    # decoder row <- input at unit norm
    np.testing.assert_allclose(p["W_dec"][DEAD], np.tile(unit, (DEAD.sum(), 1)), rtol=1e-6)
    # encoder row <- input × 0.2 × mean alive encoder norm
    want = unit * 0.2 * enc_norms[~DEAD].mean()
    np.testing.assert_allclose(p["W_enc"][:, DEAD].T, np.tile(want, (DEAD.sum(), 1)), rtol=1e-5)
    # encoder bias <- 0
    np.testing.assert_array_equal(p["b_enc"][DEAD], 0.0)
    # alive features untouched
    for k in ("W_enc", "b_enc"):
        np.testing.assert_array_equal(p[k][..., ~DEAD], p0[k][..., ~DEAD])
    np.testing.assert_array_equal(p["W_dec"][~DEAD], p0["W_dec"][~DEAD])
    np.testing.assert_array_equal(p["b_dec"], p0["b_dec"])
    # Adam moments of modified entries reset, others kept
    adam = new.opt_state.inner_state[0]
    for moments in (adam.mu, adam.nu):
        np.testing.assert_array_equal(moments["W_enc"][:, DEAD], 0.0)
        np.testing.assert_array_equal(moments["W_dec"][DEAD], 0.0)
        np.testing.assert_array_equal(moments["b_enc"][DEAD], 0.0)
        np.testing.assert_array_equal(moments["W_enc"][:, ~DEAD], 1.0)
        np.testing.assert_array_equal(moments["W_dec"][~DEAD], 1.0)
        np.testing.assert_array_equal(moments["b_enc"][~DEAD], 1.0)
        np.testing.assert_array_equal(moments["b_dec"], 1.0)
    # resampled features get a fresh window; the RNG advanced
    np.testing.assert_array_equal(new.last_fired[DEAD], STEP)
    assert not np.array_equal(new.rng, before.rng)


def test_sampling_is_proportional_to_squared_loss():
    """Two candidates with per-input losses 0.5 and 1.0: ∝ loss² gives the second 0.8 of the
    draws (∝ loss would give 2/3)."""
    cfg = Config()
    cfg.sae.d_in, cfg.sae.n_features, cfg.sae.relu.l1_coefficient = 2, 20_000, 0.0
    cfg.resample.window_steps = 1
    cfg.mesh.data, cfg.mesh.model = 2, 4
    contract = StepContract.build(cfg, make_mesh(cfg.mesh))
    state = contract.init(None)
    state = state.replace(step=jnp.asarray(5, jnp.int32),
                          params={**state.params, "W_enc": jnp.zeros_like(state.params["W_enc"]),
                                  "b_dec": jnp.zeros((2,), jnp.float32)})
    state = jax.device_put(state, contract.state_shardings)
    rows = np.array([[1.0, 0.0], [0.0, np.sqrt(2.0)]], np.float32)  # per-input losses 0.5, 1.0
    new, _ = resample(contract, state, [_inputs(contract, rows)])
    picked_second = np.asarray(new.params["W_dec"])[:, 1] > 0.5
    share = picked_second.mean()
    # ∝ loss²: 1/(0.25+1) = 0.8 ± 4σ (σ = sqrt(.8·.2/20000) ≈ 0.0028)
    assert abs(share - 0.8) < 0.012, share
