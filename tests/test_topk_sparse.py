"""The sparse TopK path (saejax/sae/topk_sparse.py) computes what the dense one does: the exact
top-k selection, the loss, every metric, the firing counts and the gradient of every parameter,
with and without dead latents for AuxK, in one piece and in many."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saejax.sae import LossContext, make_sae, topk_sparse
from saejax.sae.config import SAEConfig, TopKConfig
from saejax.sae.topk import use_sparse


@pytest.mark.parametrize("chunk", [None, 8, 16, 64])
def test_two_stage_top_k_equals_lax_top_k_ties_included(chunk):
    rng = np.random.default_rng(0)
    # few distinct values: many ties, which lax.top_k breaks by the lower index
    x = jnp.asarray(rng.integers(0, 6, size=(32, 256)), jnp.float32)
    for k in (1, 5, 8):
        want = jax.lax.top_k(x, k)
        got = topk_sparse.top_k(x, k, chunk)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def _ctx(dead):
    """Latents in `dead` have not fired for a whole window (1 step of 1 token)."""
    return LossContext(0, {"aux_coefficient": jnp.float32(0.5), "dead_tokens_aux": jnp.float32(1)},
                       steps_since_fired=jnp.where(jnp.asarray(dead), 1, 0))


def _loss_and_grads(path, x, ctx):
    cfg = SAEConfig(arch="topk", d_in=16, n_features=64, topk=TopKConfig(k=4, k_aux=8, path=path))
    sae = make_sae(cfg, seed=1)
    rng = np.random.default_rng(1)
    sae.b_enc[...] = jnp.asarray(rng.normal(size=64) * 0.1, jnp.float32)
    sae.b_dec[...] = jnp.asarray(rng.normal(size=16) * 0.3, jnp.float32)
    graphdef, params = nnx.split(sae)
    assert nnx.merge(graphdef, params).sparse == (path == "sparse")

    def loss(p):
        return nnx.merge(graphdef, p).loss(x, ctx)

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, aux, nnx.to_pure_dict(grads)


DEAD = {"some": np.arange(64) % 3 == 0,
        "fewer than k_aux": np.isin(np.arange(64), [5, 40, 63]),  # AuxK's other picks add 0
        "none": np.zeros(64, bool),
        "no record": None}


@pytest.mark.parametrize("dead, block_elements", [
    ("some", 256), ("fewer than k_aux", topk_sparse.BLOCK_ELEMENTS), ("none", 256),
    ("no record", topk_sparse.BLOCK_ELEMENTS)])
def test_sparse_loss_metrics_counts_and_gradients_equal_dense(dead, block_elements,
                                                               monkeypatch):
    # 256 elements: the encoder runs in 16 pieces of 4 features and the gathers and scatters
    # in blocks of 4 rows (AuxK's) and 4 or 8 rows (the main code's).
    monkeypatch.setattr(topk_sparse, "BLOCK_ELEMENTS", block_elements)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 16)), jnp.float32)
    mask = DEAD[dead]
    ctx = LossContext(0, {"aux_coefficient": jnp.float32(0.5)}) if mask is None else _ctx(mask)
    dense, sparse = (_loss_and_grads(p, x, ctx) for p in ("dense", "sparse"))
    np.testing.assert_allclose(sparse[0], dense[0], rtol=1e-6)
    assert sparse[1].keys() == dense[1].keys()
    np.testing.assert_array_equal(sparse[1].pop("fired"), dense[1].pop("fired"))
    for name, want in dense[1].items():
        np.testing.assert_allclose(sparse[1][name], want, rtol=1e-5, atol=1e-7, err_msg=name)
    assert (dense[1]["aux_loss"] > 0) == (dead in ("some", "fewer than k_aux"))
    for name, want in dense[2].items():
        scale = np.abs(want).max()
        assert scale > 0, name
        np.testing.assert_allclose(sparse[2][name], want, rtol=0, atol=1e-5 * scale,
                                   err_msg=name)


def test_auto_takes_the_sparse_path_for_small_k_over_f_and_encode_stays_dense():
    cfg = SAEConfig(arch="topk", d_in=16, n_features=256, topk=TopKConfig(k=4))
    assert use_sparse(cfg)  # k/F = 1/64 on CPU
    wide = dataclasses.replace(cfg, topk=TopKConfig(k=32))
    assert not use_sparse(wide)
    assert use_sparse(dataclasses.replace(wide, topk=TopKConfig(k=32, path="sparse")))
    assert not use_sparse(dataclasses.replace(cfg, topk=TopKConfig(k=4, path="dense")))
    sae = make_sae(cfg)
    f = sae.encode(jnp.ones((3, 16)))
    assert f.shape == (3, 256) and int((f > 0).sum(axis=1).max()) <= 4
