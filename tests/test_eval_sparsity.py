"""Held-out sparsity/fidelity metrics (saejax.eval.sparsity, saejax.sae.stats) and the density
PNG, on hand-made arrays whose answers are computed by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from saejax.eval.density_plot import plot_density
from saejax.eval.sparsity import batch_sums, l0_distribution, sparsity_summary
from saejax.sae.stats import density_stats, reconstruction_metrics

# 4 tokens, d = 2, F = 3; the last token is not counted (a BOS position).
X = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [100.0, 100.0]], np.float32)
X_HAT = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.0]], np.float32)
F = np.array([[0.5, 0.0, 2.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]], np.float32)
MASK = np.array([True, True, True, False])
MEAN = np.array([1.0, 1.0], np.float32)


def _sums(rows=slice(None)):
    s, c = batch_sums(jnp.asarray(X[rows]), jnp.asarray(X_HAT[rows]), jnp.asarray(F[rows] > 0),
                      jnp.asarray(MEAN), jnp.asarray(MASK[rows]))
    return {k: float(v) for k, v in s.items()}, {k: np.asarray(v) for k, v in c.items()}


def test_batch_sums_by_hand():
    s, c = _sums()
    # errors (counted rows): (0,-1) (-1,0) (0,2) -> 1 + 1 + 4
    assert s["sq_err"] == pytest.approx(6.0)
    # around mean (1,1): (0,1) (2,-1) (-1,0) -> 1 + 5 + 1
    assert s["total_var"] == pytest.approx(7.0)
    np.testing.assert_array_equal(c["fire_count"], [1, 0, 2])  # the uncounted row adds nothing
    # per-token L0 of counted rows: 2, 1, 0
    np.testing.assert_array_equal(c["l0_count"], [1, 1, 1, 0])


def test_batches_add_up_to_one_batch():
    s_all, c_all = _sums()
    s1, c1 = _sums(slice(0, 2))
    s2, c2 = _sums(slice(2, 4))
    for k in s_all:
        assert s1[k] + s2[k] == pytest.approx(s_all[k])
    for k in c_all:
        np.testing.assert_array_equal(c1[k] + c2[k], c_all[k])


def test_fvu_mse_l0_agree_with_reconstruction_metrics():
    """All rows counted and the batch's own mean: the training metric's definitions."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x_hat = x + 0.3 * rng.normal(size=(50, 8)).astype(np.float32)
    f = np.maximum(rng.normal(size=(50, 16)), 0).astype(np.float32)
    s, c = batch_sums(jnp.asarray(x), jnp.asarray(x_hat), jnp.asarray(f > 0),
                      jnp.asarray(x.mean(0)), jnp.ones(50, bool))
    got = sparsity_summary(float(s["sq_err"]), float(s["total_var"]), np.asarray(c["fire_count"]),
                           np.asarray(c["l0_count"]), 8)
    want = reconstruction_metrics(jnp.asarray(x), jnp.asarray(x_hat), jnp.asarray(f > 0))
    for k in ("mse", "fvu", "l0"):
        assert got[k] == pytest.approx(float(want[k]), rel=1e-5)


def test_summary_of_hand_sums():
    _, c = _sums()
    out = sparsity_summary(6.0, 7.0, c["fire_count"], c["l0_count"], d_in=2)
    assert out["n_tokens"] == 3
    assert out["mse"] == pytest.approx(6.0 / (3 * 2))
    assert out["fvu"] == pytest.approx(6.0 / 7.0)
    assert out["l0"] == pytest.approx(1.0)
    assert out["dead"] == 1 and out["dead_fraction"] == pytest.approx(1 / 3)


def test_l0_distribution_by_hand():
    # tokens with L0 = 0, 0, 2, 2, 2, 3
    out = l0_distribution(np.array([2, 0, 3, 1, 0, 0]))
    assert out["l0"] == pytest.approx(9 / 6)
    assert out["l0_median"] == 2 and out["l0_p90"] == 3 and out["l0_max"] == 3
    assert out["l0_hist"] == {"edges": [0, 1, 2, 3, 4], "counts": [2, 0, 3, 1]}


def test_l0_histogram_wide_bins():
    counts = np.zeros(201, np.int64)
    counts[[0, 2, 3, 120]] = [1, 4, 5, 7]
    h = l0_distribution(counts)["l0_hist"]
    # ceil(121 / 50) = 3 wide bins: [0,3) [3,6) ... [120,123)
    assert h["edges"][:3] == [0, 3, 6] and h["edges"][-1] == 123
    assert h["counts"][0] == 5 and h["counts"][1] == 5 and h["counts"][-1] == 7
    assert sum(h["counts"]) == 17


def test_density_stats_by_hand():
    # densities over 2e6 tokens: 0, 0, 5e-7, 2.5e-6, 1e-4, 1e-2 (not > 1%), 1.5e-2
    fire = np.array([0, 0, 1, 5, 200, 20_000, 30_000])
    out = density_stats(fire, 2_000_000)
    assert out["n_features"] == 7
    assert (out["dead"], out["ultralow"], out["dense"]) == (2, 1, 1)
    assert out["dead_fraction"] == pytest.approx(2 / 7)
    assert out["ultralow_fraction"] == pytest.approx(1 / 7)
    assert out["dense_fraction"] == pytest.approx(1 / 7)
    assert out["ultralow_resolvable"] is True
    hist = out["density_hist"]
    assert hist["zero"] == 2 and sum(hist["counts"]) == 5


def test_ultralow_unresolvable_with_few_tokens():
    # 1e6 tokens: one firing is density 1e-6, not below it
    out = density_stats(np.array([0, 1, 3]), 1_000_000)
    assert out["ultralow"] == 0 and out["ultralow_resolvable"] is False


def test_density_png(tmp_path):
    fire = np.array([0, 0, 0, 1, 10, 100, 1000, 5000])
    path = plot_density(fire, 10**9, tmp_path / "d.png", title="x")  # 1e-9: below the -8 default
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    assert im.size[0] > 100 and im.size[1] > 100
    with pytest.raises(ValueError, match="n_tokens"):
        plot_density(fire, 0, tmp_path / "e.png")
