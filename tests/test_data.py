"""Activation sources: determinism, exact slicing, statistics, the npy shuffle, and MMCS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from saejax.data.npy import NpySource
from saejax.data.source import ActivationSource
from saejax.data.synthetic import BLOCK, SyntheticSource, max_cosine_per_feature, mmcs

from host_slices import host_rows  # tests/host_slices.py


def recovered_fraction(decoder, true_features, threshold: float = 0.9) -> float:
    """Fraction of true features whose best-matching decoder row has cosine >= threshold."""
    return float((max_cosine_per_feature(decoder, true_features) >= threshold).mean())

# -- shared helpers -----------------------------------------------------------------------------


def write_shards(tmp_path: Path, lengths: list[int], d: int = 8,
                 dtype=np.float32) -> tuple[list[str], np.ndarray]:
    """Shards whose row r of the concatenated table is [r, r, ..., r] (so rows identify
    themselves), and that table."""
    paths, tables, start = [], [], 0
    for i, n in enumerate(lengths):
        rows = np.repeat(np.arange(start, start + n, dtype=np.float64)[:, None], d, axis=1)
        rows += np.arange(d) / (10 * d)  # columns differ too, so transposes would show
        path = tmp_path / f"shard_{i:03d}.npy"
        np.save(path, rows.astype(dtype))
        paths.append(str(path))
        tables.append(rows.astype(dtype).astype(np.float32))
        start += n
    return paths, np.concatenate(tables)


def row_ids(x: np.ndarray) -> np.ndarray:
    """Table row index of each row written by `write_shards`."""
    return np.rint(x[:, 0]).astype(np.int64)


def assert_slicing_exact(src: ActivationSource, step: int, batch_size: int) -> None:
    whole = src.rows(step, 0, batch_size, batch_size)
    assert whole.dtype == np.float32 and whole.shape == (batch_size, src.d_in)
    for k in sorted({0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 3, batch_size // 2, batch_size - 1,
                     batch_size}):
        if k > batch_size:
            continue
        parts = np.concatenate([src.rows(step, 0, k, batch_size),
                                src.rows(step, k, batch_size, batch_size)])
        assert parts.tobytes() == whole.tobytes(), f"split at {k}"
    # three unequal pieces, and a slice in the middle
    a, b = batch_size // 3, batch_size // 3 + 5
    three = np.concatenate([src.rows(step, 0, a, batch_size), src.rows(step, a, b, batch_size),
                            src.rows(step, b, batch_size, batch_size)])
    assert three.tobytes() == whole.tobytes()


@pytest.fixture(scope="module")
def synth() -> SyntheticSource:
    return SyntheticSource(d_in=32, n_features=128, p_active=0.05, seed=3)


# -- interface helpers ------------------------------------------------------------------------


def test_sources_satisfy_protocol(synth, tmp_path):
    paths, _ = write_shards(tmp_path, [10])
    assert isinstance(synth, ActivationSource)
    assert isinstance(NpySource(paths), ActivationSource)


def test_host_rows_partitions_the_global_batch(synth):
    whole = synth.rows(5, 0, 600, 600)
    parts = [host_rows(synth, 5, 600, p, 4) for p in range(4)]
    assert all(p.shape == (150, synth.d_in) for p in parts)
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    assert host_rows(synth, 5, 600, 0, 1).tobytes() == whole.tobytes()


def test_host_rows_rejects_indivisible_batch(synth):
    with pytest.raises(ValueError, match="batch_size"):
        host_rows(synth, 0, 10, 0, 3)
    with pytest.raises(ValueError, match="process_index"):
        host_rows(synth, 0, 12, 3, 3)


@pytest.mark.parametrize("args", [(0, -1, 4, 8), (0, 2, 1, 8), (0, 0, 9, 8), (-1, 0, 4, 8),
                                  (0, 0, 0, 0)])
def test_rows_rejects_ranges_outside_the_batch(synth, args):
    with pytest.raises(ValueError):
        synth.rows(*args)


# -- synthetic source -------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_seeded(synth):
    a = synth.rows(2, 0, 300, 300)
    assert a.tobytes() == synth.rows(2, 0, 300, 300).tobytes()
    again = SyntheticSource(d_in=32, n_features=128, p_active=0.05, seed=3)
    assert a.tobytes() == again.rows(2, 0, 300, 300).tobytes()
    assert not np.array_equal(a, synth.rows(3, 0, 300, 300)), "steps must differ"
    other = SyntheticSource(d_in=32, n_features=128, p_active=0.05, seed=4)
    assert not np.array_equal(a, other.rows(2, 0, 300, 300)), "seeds must differ"
    assert not np.allclose(synth.features, other.features)


@pytest.mark.parametrize("kwargs", [{}, {"correlated_groups": 8}, {"p_decay": 3.0},
                                    {"magnitude": "exponential"},
                                    {"correlated_groups": 7, "p_decay": 2.0}])
@pytest.mark.parametrize("batch_size", [1000, 2 * BLOCK, 17])
def test_synthetic_slicing_is_exact(kwargs, batch_size):
    src = SyntheticSource(d_in=16, n_features=64, p_active=0.05, seed=1, **kwargs)
    assert_slicing_exact(src, step=7, batch_size=batch_size)


def test_synthetic_sample_is_deterministic_and_distinct_from_training(synth):
    s = synth.sample(700, seed=11)
    assert s.dtype == np.float32 and s.shape == (700, synth.d_in)
    assert s.tobytes() == synth.sample(700, seed=11).tobytes()
    assert not np.array_equal(s, synth.sample(700, seed=12))
    assert not np.array_equal(s[:BLOCK], synth.rows(11, 0, BLOCK, 700)[:BLOCK])
    assert synth.sample(0, seed=1).shape == (0, synth.d_in)


def test_synthetic_features_are_unit_gaussian_directions(synth):
    f = synth.features
    assert f.shape == (128, 32) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-6)


def test_synthetic_rows_are_nonnegative_combinations_of_features():
    src = SyntheticSource(d_in=64, n_features=256, p_active=0.02, seed=0)
    x, codes = src.rows_with_codes(0, 0, 4096, 4096)
    assert codes.shape == (4096, 256) and codes.dtype == np.float32
    assert (codes >= 0).all() and codes.max() <= 1.0
    np.testing.assert_allclose(x, codes @ src.features, atol=1e-5)
    assert x.tobytes() == src.rows(0, 0, 4096, 4096).tobytes()
    # mean L0 ≈ n·p = 5.12; the std of the mean over 4096 rows is ~0.035
    l0 = (codes > 0).sum(axis=1)
    assert abs(l0.mean() - 256 * 0.02) < 0.2
    # features independent: L0 ~ Binomial(n, p), so its variance ≈ n p (1-p)
    assert abs(l0.var() / (256 * 0.02 * 0.98) - 1) < 0.15
    # uniform magnitudes on the active entries, mean 1/2
    assert abs(codes[codes > 0].mean() - 0.5) < 0.02


def test_synthetic_decaying_probabilities_keep_mean_l0():
    src = SyntheticSource(d_in=32, n_features=200, p_active=0.02, p_decay=3.0, seed=0)
    assert src.feature_probs[0] > 5 * src.feature_probs[-1]
    _, codes = src.rows_with_codes(0, 0, 4096, 4096)
    freq = (codes > 0).mean(axis=0)
    assert abs((codes > 0).sum(axis=1).mean() - 200 * 0.02) < 0.2
    assert freq[:20].mean() > 3 * freq[-20:].mean()


def test_synthetic_correlated_groups_co_activate_with_unchanged_marginals():
    p, n = 0.01, 400
    src = SyntheticSource(d_in=32, n_features=n, p_active=p, correlated_groups=10, seed=2)
    assert src.groups is not None and np.bincount(src.groups).tolist() == [40] * 10
    active = np.concatenate([src.rows_with_codes(s, 0, 4096, 4096)[1] > 0 for s in range(3)])
    assert abs(active.sum(axis=1).mean() - n * p) < 0.25
    # P(j active | i active) for i, j in the same group ≈ p / q = sqrt(p) = 0.1, vs p otherwise
    a = active.astype(np.float32)
    co = (a.T @ a) / np.maximum(a.sum(axis=0), 1)[:, None]
    same = src.groups[:, None] == src.groups[None, :]
    np.fill_diagonal(same, False)
    other = ~same
    np.fill_diagonal(other, False)
    assert abs(co[same].mean() - np.sqrt(p)) < 0.02
    assert co[other].mean() < 2 * p


def test_synthetic_unequal_groups_with_decay_keep_marginals():
    """Unequal group sizes (padding) and decaying probabilities (thinning) together."""
    src = SyntheticSource(d_in=16, n_features=203, p_active=0.03, correlated_groups=10,
                          p_decay=2.0, seed=4)
    assert sorted(set(np.bincount(src.groups).tolist())) == [20, 21]
    active = np.concatenate([src.rows_with_codes(s, 0, 4096, 4096)[1] > 0 for s in range(4)])
    assert abs(active.sum(axis=1).mean() - 203 * 0.03) < 0.2
    # per-feature frequency tracks its probability: 16384 rows, p_i in ~[0.01, 0.07]
    np.testing.assert_allclose(active.mean(axis=0), src.feature_probs, atol=0.012)


def test_synthetic_exponential_magnitudes():
    src = SyntheticSource(d_in=16, n_features=64, p_active=0.1, magnitude="exponential", seed=0)
    _, codes = src.rows_with_codes(0, 0, 4096, 4096)
    v = codes[codes > 0]
    assert abs(v.mean() - 1.0) < 0.05 and v.max() > 3.0


@pytest.mark.parametrize("kwargs, field", [
    ({"d_in": 0}, "d_in"), ({"n_features": 0}, "n_features"), ({"p_active": 0.0}, "p_active"),
    ({"p_active": 1.5}, "p_active"), ({"magnitude": "gaussian"}, "magnitude"),
    ({"correlated_groups": 65}, "correlated_groups"), ({"seed": -1}, "seed"),
    ({"p_decay": -1.0}, "p_decay")])
def test_synthetic_rejects_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticSource(**{"d_in": 16, "n_features": 64, **kwargs})


# -- MMCS ---------------------------------------------------------------------------------------


def test_mmcs_is_one_for_permuted_scaled_true_features(synth):
    rng = np.random.default_rng(0)
    true = synth.features
    decoder = true[rng.permutation(len(true))] * rng.uniform(0.1, 10, (len(true), 1))
    decoder = np.concatenate([decoder, np.zeros((5, true.shape[1])), -decoder[:3]])
    assert mmcs(decoder, true) == pytest.approx(1.0, abs=1e-5)
    assert recovered_fraction(decoder, true) == 1.0


def test_mmcs_is_low_for_a_random_decoder():
    rng = np.random.default_rng(0)
    true = rng.standard_normal((256, 64))
    value = mmcs(rng.standard_normal((256, 64)), true)
    assert 0.2 < value < 0.5
    assert recovered_fraction(rng.standard_normal((256, 64)), true) == 0.0


def test_mmcs_counts_half_recovered_dictionary_and_ignores_zero_rows():
    rng = np.random.default_rng(1)
    true = np.linalg.qr(rng.standard_normal((64, 64)))[0]  # orthonormal rows
    decoder = np.concatenate([true[:32], np.zeros((32, 64))])
    per = max_cosine_per_feature(decoder, true)
    assert np.isfinite(per).all()
    np.testing.assert_allclose(per[:32], 1.0, atol=1e-5)
    np.testing.assert_allclose(per[32:], 0.0, atol=1e-5)
    assert mmcs(decoder, true) == pytest.approx(0.5, abs=1e-5)
    assert recovered_fraction(decoder, true, threshold=0.9) == 0.5
    assert mmcs(np.zeros((8, 64)), true) == 0.0


def test_mmcs_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="width"):
        mmcs(np.ones((4, 8)), np.ones((4, 9)))


# -- npy source ---------------------------------------------------------------------------------


def test_npy_epoch_visits_every_row_exactly_once(tmp_path):
    paths, table = write_shards(tmp_path, [37, 5, 58])  # N = 100
    src = NpySource(paths, seed=0)
    assert src.n_rows == 100 and src.d_in == 8
    batch = 20  # 5 steps per epoch
    for epoch in range(2):
        seen = np.concatenate([row_ids(src.rows(s, 0, batch, batch))
                               for s in range(5 * epoch, 5 * epoch + 5)])
        assert sorted(seen.tolist()) == list(range(100))
    first = np.concatenate([row_ids(src.rows(s, 0, batch, batch)) for s in range(5)])
    second = np.concatenate([row_ids(src.rows(s, 0, batch, batch)) for s in range(5, 10)])
    assert not np.array_equal(first, second), "each epoch has its own order"
    assert not np.array_equal(first, np.arange(100)), "rows are shuffled"
    # the bytes are the stored rows, converted to float32
    x = src.rows(3, 0, batch, batch)
    np.testing.assert_array_equal(x, table[row_ids(x)])


def test_npy_batches_straddling_epochs(tmp_path):
    paths, _ = write_shards(tmp_path, [13, 10])  # N = 23, batch 10 does not divide it
    src = NpySource(paths, seed=5)
    ids = np.concatenate([row_ids(src.rows(s, 0, 10, 10)) for s in range(7)])  # 70 rows
    for e in range(3):
        assert sorted(ids[23 * e:23 * (e + 1)].tolist()) == list(range(23))
    big = row_ids(src.rows(0, 0, 50, 50))  # batch larger than the table: 2+ epochs in one step
    assert sorted(big[:23].tolist()) == list(range(23))
    assert sorted(big[23:46].tolist()) == list(range(23))


@pytest.mark.parametrize("batch_size", [64, 30, 7])
def test_npy_slicing_is_exact_and_deterministic(tmp_path, batch_size):
    paths, _ = write_shards(tmp_path, [40, 1, 25])
    src = NpySource(paths, seed=2)
    for step in (0, 3, 11):
        assert_slicing_exact(src, step, batch_size)
    again = NpySource(paths, seed=2)
    assert again.rows(4, 0, batch_size, batch_size).tobytes() == \
        src.rows(4, 0, batch_size, batch_size).tobytes()
    assert not np.array_equal(NpySource(paths, seed=3).rows(0, 0, batch_size, batch_size),
                              src.rows(0, 0, batch_size, batch_size))


def test_npy_glob_float16_and_sample(tmp_path):
    paths, table = write_shards(tmp_path, [30, 20], d=4, dtype=np.float16)
    src = NpySource(str(tmp_path / "shard_*.npy"), seed=0)
    assert src.paths == paths and src.n_rows == 50
    x = src.rows(0, 0, 50, 50)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, table[row_ids(x)])
    s = src.sample(40, seed=9)
    assert s.dtype == np.float32 and s.shape == (40, 4)
    assert len(set(row_ids(s).tolist())) == 40, "without replacement"
    assert s.tobytes() == src.sample(40, seed=9).tobytes()
    assert src.sample(120, seed=1).shape == (120, 4), "with replacement when n > N"


def test_npy_host_rows(tmp_path):
    paths, _ = write_shards(tmp_path, [50, 50])
    src = NpySource(paths)
    whole = src.rows(2, 0, 64, 64)
    assert np.concatenate([host_rows(src, 2, 64, p, 8) for p in range(8)]).tobytes() == \
        whole.tobytes()


def test_npy_rejects_mismatched_widths(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 8), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((4, 6), np.float32))
    with pytest.raises(ValueError, match=r"b\.npy.*\(4, 6\).*a\.npy.*\(4, 8\)"):
        NpySource([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")])


def test_npy_rejects_non_2d(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"c\.npy.*\(2, 3, 4\)"):
        NpySource([str(tmp_path / "c.npy")])


def test_npy_rejects_empty_glob_and_missing_file(tmp_path):
    pattern = str(tmp_path / "nothing_*.npy")
    with pytest.raises(ValueError, match="nothing_"):
        NpySource(pattern)
    with pytest.raises(ValueError, match="missing.npy"):
        NpySource([str(tmp_path / "missing.npy")])
    with pytest.raises(ValueError, match="paths"):
        NpySource([])


def test_npy_rejects_non_float_and_non_npy(tmp_path):
    np.save(tmp_path / "ints.npy", np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match=r"ints\.npy.*int32"):
        NpySource([str(tmp_path / "ints.npy")])
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"junk\.npy"):
        NpySource([str(tmp_path / "junk.npy")])


def test_npy_rejects_tables_without_rows(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="no rows"):
        NpySource([str(tmp_path / "empty.npy")])
