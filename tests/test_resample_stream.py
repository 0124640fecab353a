"""Resampling streams its inputs: memory does not grow with resample.n_inputs, nothing is drawn
when no feature is dead, and the chunked draw is still ∝ loss² over all inputs."""

import jax
import jax.numpy as jnp
import numpy as np

from saejax.config import Config
from saejax.sharding import make_mesh
from saejax.train.loop import resample_chunks
from saejax.train.resample import CHUNK, resample
from saejax.train.step import StepContract

D, F = 16, 256


class Recorder:
    """A batch provider that records the sample sizes asked of it."""

    def __init__(self, contract):
        self.contract, self.asked = contract, []

    def sample(self, n, seed):
        self.asked.append(n)
        x = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
        return jax.device_put(x, self.contract.batch_sharding)


def _setup(n_inputs, dead_every=2):
    cfg = Config()
    cfg.sae.d_in, cfg.sae.n_features = D, F
    cfg.resample.window_steps, cfg.resample.n_inputs = 10, n_inputs
    cfg.mesh.data, cfg.mesh.model = 4, 2
    contract = StepContract.build(cfg, make_mesh(cfg.mesh))
    state = contract.init(None)
    dead = np.arange(F) % dead_every == 0 if dead_every else np.zeros(F, bool)
    state = state.replace(step=jnp.asarray(100, jnp.int32),
                          last_fired=jnp.asarray(np.where(dead, 0, 100), jnp.int32))
    return cfg, contract, jax.device_put(state, contract.state_shardings), int(dead.sum())


def test_memory_does_not_grow_with_n_inputs():
    temps = {}
    for n_inputs in (CHUNK, 8 * CHUNK):
        cfg, contract, state, n_dead = _setup(n_inputs)
        data = Recorder(contract)
        state, n = resample(contract, state, resample_chunks(data, cfg, 0, contract.mesh))
        assert n == n_dead and max(data.asked) <= CHUNK
        assert sum(data.asked) >= n_inputs * 0.99
        draws = contract.resample_begin_fn(state)
        x = jax.ShapeDtypeStruct((CHUNK, D), jnp.float32, sharding=contract.batch_sharding)
        compiled = contract.resample_chunk_fn.lower(state, draws, x).compile()
        temps[n_inputs] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[CHUNK] == temps[8 * CHUNK]
    # far below what the [n_inputs, F] losses of the unchunked procedure would take
    assert temps[8 * CHUNK] < 8 * CHUNK * F * 4 / 4


def test_nothing_is_drawn_when_no_feature_is_dead():
    cfg, contract, state, _ = _setup(4 * CHUNK, dead_every=0)
    data = Recorder(contract)
    before = jax.device_get(state.params)
    state, n = resample(contract, state, resample_chunks(data, cfg, 0, contract.mesh))
    assert n == 0 and data.asked == []
    for k, v in jax.device_get(state.params).items():
        np.testing.assert_array_equal(v, before[k])


def test_chunked_draws_are_proportional_to_squared_loss_over_all_chunks():
    """Chunk 1 holds inputs of loss 1, chunk 2 of loss 2 (zero params decode to b_dec = 0, so the
    loss of x is ||x||²/d): ∝ loss² gives chunk 2 four fifths of the draws."""
    cfg, contract, state, _ = _setup(2 * CHUNK, dead_every=1)
    zeros = {k: jnp.zeros_like(v) for k, v in state.params.items()}
    state = jax.device_put(state.replace(params=zeros), contract.state_shardings)
    ones = np.ones((CHUNK, D), np.float32)
    chunks = [jax.device_put(ones * s, contract.batch_sharding) for s in (1.0, np.sqrt(2.0))]
    draws = contract.resample_begin_fn(state)
    for x in chunks:
        draws = contract.resample_chunk_fn(state, draws, x)
    share = float(np.mean(np.asarray(draws.weighted)[:, 0] > 1.2))  # drawn from chunk 2
    assert abs(share - 0.8) < 4 * np.sqrt(0.16 / F), share
    new, n = resample(contract, state, iter(chunks))  # (donates `state`)
    assert n == F
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new.params["W_dec"]), axis=1), 1.0,
                               rtol=1e-5)
