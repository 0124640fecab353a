"""The same run on 1, 2, 4 and 8 devices, with data-only, model-only and mixed meshes, gives the
same parameters to float32 rounding, including a dead-feature resampling event."""

import jax
import numpy as np
import pytest

from saejax.config import Config
from saejax.sharding import make_mesh
from saejax.train.resample import resample
from saejax.train.step import StepContract

STEPS, RESAMPLE_AT = 30, 15


def _cfg(arch):
    cfg = Config()
    cfg.sae.arch, cfg.sae.d_in, cfg.sae.n_features = arch, 16, 64
    cfg.sae.relu.l1_coefficient = 0.3  # with lr 0.03: 6 features die before step 15
    cfg.sae.relu.target_l0 = 0.0
    cfg.sae.topk.k, cfg.sae.topk.k_aux, cfg.sae.topk.dead_tokens_aux = 4, 16, 64 * 3
    cfg.train.batch_size, cfg.train.steps, cfg.train.log_every = 64, STEPS, 10
    cfg.optim.lr = 3e-2
    cfg.resample.window_steps = 5
    cfg.resample.n_inputs = 256
    return cfg


def _data(step, n=64):
    rng = np.random.default_rng(step)
    x = np.maximum(rng.normal(size=(n, 16)), 0) * rng.uniform(0.5, 2, size=(n, 1))
    return x.astype(np.float32)


def _run(arch, data, model):
    cfg = _cfg(arch)
    cfg.mesh.data, cfg.mesh.model = data, model
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[: data * model])
    c = StepContract.build(cfg, mesh)
    state = c.init(jax.device_put(_data(10**6 + 1, 256), c.batch_sharding))
    n_resampled = None
    for step in range(STEPS):
        state, _ = c.step_fn(state, jax.device_put(_data(step), c.batch_sharding))
        if step + 1 == RESAMPLE_AT and arch == "relu":
            inputs = jax.device_put(_data(10**6, 256), c.batch_sharding)
            state, n_resampled = resample(c, state, [inputs])
    return jax.device_get(state), n_resampled


# Data-only, model-only and mixed, at 2, 4 and 8 devices (each mesh costs a compile of the
# step and the resampling pieces; tests/test_sweep.py adds the `sae` axis, and
# tests/test_topk_model_sharded.py TopK's sparse path, on further meshes).
MESHES = {"relu": [(2, 1), (1, 8), (2, 4)], "topk": [(1, 4), (4, 2)]}


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_meshes_agree(arch):
    ref, n_ref = _run(arch, 1, 1)
    if arch == "relu":
        assert 0 < int(n_ref) < 64, "the test must exercise a real resampling event"
    for data, model in MESHES[arch]:
        got, n = _run(arch, data, model)
        if arch == "relu":
            assert int(n) == int(n_ref)
        for k in ref.params:
            a, b = ref.params[k], got.params[k]
            scale = np.abs(a).max()
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * scale,
                                       err_msg=f"{k} on mesh data={data} model={model}")
        np.testing.assert_array_equal(got.last_fired, ref.last_fired)
