"""Hyperparameters that leave shapes alone are data in the state: one compiled step serves many
settings (the base of sweeps compiled into one step), and gives what a step compiled for each
setting gives."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saejax.config import load_config
from saejax.sharding import make_mesh
from saejax.train.step import StepContract


def _cfg(arch, changes=()):
    return load_config(None, [
        f"sae.arch={arch}", "sae.d_in=8", "sae.n_features=32", "sae.topk.k=4", "sae.topk.k_aux=8",
        "sae.topk.dead_tokens_aux=64", "train.batch_size=32", "train.steps=10",
        "optim.warmup_steps=2", "optim.grad_clip=1.0", "mesh.data=2", "mesh.model=2", *changes])


def _run(contract, compiled, state, steps=4):
    for s in range(steps):
        x = np.random.default_rng(s).normal(size=(32, 8)).astype(np.float32)
        state, _ = compiled(state, jax.device_put(x, contract.batch_sharding))
    return jax.device_get(state.params)


# (family, config changes for the second setting). Every family's data fields are checked to
# leave the compiled program unchanged in tests/test_sweep.py; this runs one through it.
SETTINGS = [
    ("relu", ["sae.relu.l1_coefficient=0.5", "sae.relu.l1_warmup_fraction=0.3", "optim.lr=1e-2",
              "optim.b1=0.5", "optim.b2=0.9", "optim.eps=1e-3", "optim.grad_clip=0.1"]),
]


@pytest.mark.parametrize("arch,changes", SETTINGS)
def test_one_compiled_step_serves_other_settings(arch, changes):
    base, other = _cfg(arch), _cfg(arch, changes)
    c_base, c_other = (StepContract.build(c, make_mesh(c.mesh, jax.devices()[:4]))
                       for c in (base, other))
    compiled = c_base.step_fn.lower(c_base.abstract_state(), jax.ShapeDtypeStruct(
        (32, 8), jnp.float32, sharding=c_base.batch_sharding)).compile()

    # the other setting's state, run through the step compiled for the base setting ...
    state = c_other.init(None)
    got = _run(c_base, compiled, state)
    # ... equals the other setting run through its own step
    want = _run(c_other, c_other.step_fn, c_other.init(None))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # and the setting matters: the base setting's own run differs
    base_params = _run(c_base, compiled, c_base.init(None))
    assert any(not np.allclose(base_params[k], want[k]) for k in want)


def test_hyperparameters_live_in_the_state():
    c = StepContract.build(_cfg("relu"), make_mesh(_cfg("relu").mesh, jax.devices()[:4]))
    state = c.init(None)
    assert {"lr", "l1_coefficient", "l1_warmup_steps", "resample_window_steps",
            "resample_enc_scale"} <= set(state.hparams)
    assert float(optax.tree.get(state.opt_state, "b1")) == pytest.approx(0.9)
    assert float(optax.tree.get(state.opt_state, "max_norm")) == pytest.approx(1.0)
