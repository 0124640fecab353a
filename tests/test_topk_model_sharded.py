"""Feature-sharded TopK without gathering [B,F]: with the dictionary split over devices, the
sparse step selects on each feature shard and decodes per shard (saejax/sae/topk_sparse.py), so
its compiled HLO all-gathers only the k·shards candidates per token, never the pre-activations
or W_dec; and the same run on 2, 4 and 8 devices (data-only, model-only and mixed meshes)
agrees with the dense path on one device. (tests/test_step_sharding.py checks every mesh with
the `auto` path, dense at its k/F on CPU.)"""

import functools
import re

import jax
import numpy as np
import pytest

from saejax.config import Config
from saejax.sharding import make_mesh
from saejax.train.step import StepContract

B, D, F = 64, 16, 256  # F is no other dimension of the step, so an all-gather of it shows


def _contract(path, data, model):
    cfg = Config()
    cfg.sae.arch, cfg.sae.d_in, cfg.sae.n_features = "topk", D, F
    cfg.sae.topk.k, cfg.sae.topk.k_aux, cfg.sae.topk.path = 4, 8, path
    cfg.sae.topk.dead_tokens_aux = B  # latents that miss a step are dead: AuxK runs
    cfg.train.batch_size, cfg.train.steps = B, 10
    cfg.optim.lr = 3e-2
    cfg.mesh.data, cfg.mesh.model = data, model
    return StepContract.build(cfg, make_mesh(cfg.mesh, jax.devices()[: data * model]))


@functools.cache
def _compiled(path, data, model):
    """The contract and its step compiled ahead of time (shared by the checks below)."""
    c = _contract(path, data, model)
    batch = jax.ShapeDtypeStruct((B, D), np.float32, sharding=c.batch_sharding)
    return c, c.step_fn.lower(c.abstract_state(), batch).compile()


def _gathered_shapes(path):
    """Result shapes of the all-gathers in the compiled step on a data 2 × model 4 mesh."""
    hlo = _compiled(path, 2, 4)[1].as_text()
    found = re.findall(r"= \(?\w+\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", hlo)
    return [tuple(int(n) for n in dims.split(",") if n) for dims in found]


def test_sparse_step_gathers_only_candidates():
    shapes = _gathered_shapes("sparse")
    assert shapes, "the candidates are all-gathered across the feature shards"
    assert all(F not in s for s in shapes), shapes
    # the checker sees [B,F] gathers where they happen: XLA's lax.top_k over sharded features
    assert any(F in s for s in _gathered_shapes("dense"))


def _train(path, data, model, steps=6):
    c, step = _compiled(path, data, model)
    rng = np.random.default_rng(0)
    state = c.init(jax.device_put(rng.normal(size=(256, D)).astype(np.float32), c.batch_sharding))
    for _ in range(steps):
        x = np.maximum(rng.normal(size=(B, D)), 0).astype(np.float32)
        state, metrics = step(state, jax.device_put(x, c.batch_sharding))
    return jax.device_get(state), jax.device_get(metrics)


reference = functools.cache(lambda: _train("dense", 1, 1))


# 2, 4 and 8 devices: model-only, data-only, mixed (one device: tests/test_topk_sparse.py)
@pytest.mark.parametrize("path, mesh", [("sparse", (1, 2)), ("sparse", (4, 1)),
                                        ("sparse", (2, 4)), ("dense", (2, 4))])
def test_meshes_agree_with_one_device_dense(path, mesh):
    ref, ref_metrics = reference()
    got, metrics = _train(path, *mesh)
    assert ref_metrics["aux_loss"] > 0, "AuxK must run"
    for k, a in ref.params.items():
        np.testing.assert_allclose(got.params[k], a, rtol=0, atol=2e-5 * np.abs(a).max(),
                                   err_msg=f"{k}: {path} on {mesh}")
    np.testing.assert_array_equal(got.last_fired, ref.last_fired)
    np.testing.assert_array_equal(got.fire_count, ref.fire_count)
    if mesh == (1, 2):  # exact resume needs a step that is a function of its state (on CPU
        # XLA's scatter-adds are deterministic; on GPU they need --xla_gpu_deterministic_ops)
        again, _ = _train(path, *mesh)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(again)):
            np.testing.assert_array_equal(x, y)
