"""Synthetic superposition data with known ground-truth features, and the MMCS recovery metric.

The generative model follows Sharkey, Braun & Millidge (2022), "Taking features out of
superposition with sparse autoencoders", and Anthropic's "Toy Models of Superposition":

* `n_features` ground-truth directions in `d_in` dimensions (typically n_features > d_in, so the
  features are in superposition): i.i.d. Gaussian vectors normalised to unit length, kept as
  `SyntheticSource.features` [n_features, d_in].
* Each feature i is active in a vector with a small probability p_i. By default every p_i equals
  `p_active`. With `p_decay > 0` they decay exponentially with the feature index (Sharkey et al.'s
  option of features with decaying frequencies): p_i ∝ exp(-p_decay · i / n_features), scaled so
  that their mean is still `p_active` (then clipped to 1), so the expected L0 stays n·p_active.
* Active features get a non-negative magnitude: Uniform(0, 1] (the paper's choice) or Exp(1)
  (`magnitude="exponential"`, heavier tailed). x = Σ_active magnitude_i · feature_i; no noise.
* Optional correlation (`correlated_groups = G > 0`): the features are split by a seeded random
  partition into G groups of (nearly) equal size. In each vector each group "fires" with
  probability q_g = sqrt(max_{i∈g} p_i), and a member i of a firing group is active with
  probability p_i / q_g, independently. The marginal probability is still exactly p_i, but
  features of the same group co-occur: P(j active | i active) = p_j / q_g ≈ sqrt(p), much more
  than p. (For p = 0.01 a feature's group-mates appear 10× more often alongside it.)

Determinism with cheap slicing: the rows of a step are generated in fixed blocks of `BLOCK` rows,
block b of step s drawing from `np.random.default_rng([seed, 0, s, b])`. A request for rows
[start, stop) generates only the blocks it overlaps and keeps the rows asked for, so any split of
the batch reassembles it bit for bit.

Speed: active entries are drawn by geometric skipping over the flattened [rows, n_features] grid
(with groups: over the members of the groups that fired), so no dense random matrix is made and
the cost is proportional to the number of active entries. Then x = codes @ features is a
sparse-dense product (scipy CSR, a dependency of jax) whose per-row sums run in a fixed order,
so every row's bits depend only on its own codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse

from saejax.data.source import check_row_request, check_sample_request
from saejax.sharding import to_host

BLOCK = 256
"""Rows per independently seeded block; part of the data definition (changing it changes data)."""

# Second word of every seed, so training rows, sample() rows and the features never share a stream.
_TRAIN_STREAM, _SAMPLE_STREAM, _FEATURE_STREAM, _GROUP_STREAM = 0, 1, 2, 3

Magnitude = Literal["uniform", "exponential"]


@dataclass(frozen=True)
class SparseCodes:
    """Ground-truth codes of a block of rows in CSR form: row r's active features are
    `feature[indptr[r]:indptr[r+1]]` with magnitudes `value[...]` (in generation order)."""

    indptr: np.ndarray  # [rows + 1] int64
    feature: np.ndarray  # [nnz] int32
    value: np.ndarray  # [nnz] float32

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def row_slice(self, lo: int, hi: int) -> SparseCodes:
        a, b = int(self.indptr[lo]), int(self.indptr[hi])
        return SparseCodes(self.indptr[lo:hi + 1] - a, self.feature[a:b], self.value[a:b])

    def to_csr(self, n_features: int) -> scipy.sparse.csr_array:
        return scipy.sparse.csr_array((self.value, self.feature, self.indptr),
                                      shape=(self.n_rows, n_features))


class SyntheticSource:
    """Sparse non-negative combinations of known unit feature directions (see module docstring)."""

    def __init__(self, d_in: int, n_features: int, p_active: float = 0.01,
                 magnitude: Magnitude = "uniform", correlated_groups: int = 0, seed: int = 0,
                 p_decay: float = 0.0):
        _check_config(d_in, n_features, p_active, magnitude, correlated_groups, seed, p_decay)
        self.d_in = d_in
        self.n_features = n_features
        self.p_active = float(p_active)
        self.magnitude: Magnitude = magnitude
        self.correlated_groups = correlated_groups
        self.seed = seed
        self.p_decay = float(p_decay)
        self.features: np.ndarray = unit_gaussian_directions(n_features, d_in, seed)
        """[n_features, d_in] float32 ground-truth directions, unit norm."""
        self.feature_probs: np.ndarray = feature_probabilities(n_features, p_active, p_decay)
        """[n_features] float64 marginal probability that each feature is active."""
        self.groups: np.ndarray | None = None
        """[n_features] int group id of each feature, or None when features are independent."""
        self._group_model: GroupModel | None = None
        if correlated_groups:
            self.groups = random_partition(n_features, correlated_groups, seed)
            self._group_model = GroupModel.build(self.feature_probs, self.groups, correlated_groups)

    def __repr__(self) -> str:
        return (f"SyntheticSource(d_in={self.d_in}, n_features={self.n_features}, "
                f"p_active={self.p_active}, magnitude={self.magnitude!r}, "
                f"correlated_groups={self.correlated_groups}, seed={self.seed}, "
                f"p_decay={self.p_decay})")

    # -- the ActivationSource interface -------------------------------------------------------

    def rows(self, step: int, start: int, stop: int, batch_size: int) -> np.ndarray:
        """Rows [start, stop) of step `step`'s global batch (see `ActivationSource.rows`)."""
        return self.rows_with_codes(step, start, stop, batch_size, dense_codes=False)[0]

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n rows from the training distribution, from a stream disjoint from training rows."""
        check_sample_request(n, seed)
        codes = self._codes_for_range([self.seed, _SAMPLE_STREAM, seed], 0, n, n)
        return self._decode(codes)

    def summary_metrics(self, decoder) -> dict:
        """MMCS of a trained decoder [F, d_in] against the ground-truth features."""
        return {"mmcs": mmcs(to_host(decoder), self.features)}

    # -- ground truth, for tests and analysis ---------------------------------------------------

    def rows_with_codes(self, step: int, start: int, stop: int, batch_size: int,
                        dense_codes: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """`rows(...)` together with its ground-truth codes, so x == codes @ features.

        Codes are a dense float32 [stop-start, n_features] array (None if dense_codes=False)."""
        check_row_request(step, start, stop, batch_size)
        codes = self._codes_for_range([self.seed, _TRAIN_STREAM, step], start, stop, batch_size)
        x = self._decode(codes)
        return x, (codes.to_csr(self.n_features).toarray() if dense_codes else None)

    # -- internals -------------------------------------------------------------------------------

    def _codes_for_range(self, prefix: list[int], start: int, stop: int,
                         total: int) -> SparseCodes:
        """Codes of rows [start, stop) of a `total`-row batch whose block b is seeded prefix+[b].

        Block b covers rows [b*BLOCK, min((b+1)*BLOCK, total)); its contents depend only on the
        seed and its length, never on which part of it was asked for."""
        pieces = []
        for b in range(start // BLOCK, -(-stop // BLOCK)):
            b0 = b * BLOCK
            block = self._block_codes(np.random.default_rng([*prefix, b]), min(BLOCK, total - b0))
            pieces.append(block.row_slice(max(start, b0) - b0, min(stop, b0 + BLOCK) - b0))
        return concat_codes(pieces)

    def _block_codes(self, rng: np.random.Generator, n_rows: int) -> SparseCodes:
        """Draw which features are active in n_rows rows, and their magnitudes."""
        if self._group_model is None:
            row, feature = independent_activity(rng, self.feature_probs, n_rows)
        else:
            row, feature = self._group_model.activity(rng, n_rows)
        value = draw_magnitudes(rng, self.magnitude, len(feature))
        indptr = np.zeros(n_rows + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=n_rows), out=indptr[1:])
        return SparseCodes(indptr, feature.astype(np.int32), value)

    def _decode(self, codes: SparseCodes) -> np.ndarray:
        """x = codes @ features, float32, each row summed in a fixed order."""
        if codes.n_rows == 0:
            return np.zeros((0, self.d_in), np.float32)
        x = codes.to_csr(self.n_features) @ self.features
        return np.ascontiguousarray(x, dtype=np.float32)


# -- pieces of the generative model ------------------------------------------------------------

def _check_config(d_in: int, n_features: int, p_active: float, magnitude: str,
                  correlated_groups: int, seed: int, p_decay: float) -> None:
    if d_in < 1:
        raise ValueError(f"d_in must be >= 1, got {d_in}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if not 0.0 < p_active <= 1.0:
        raise ValueError(f"p_active must be in (0, 1], got {p_active}")
    if magnitude not in ("uniform", "exponential"):
        raise ValueError(f"magnitude must be 'uniform' or 'exponential', got {magnitude!r}")
    if not 0 <= correlated_groups <= n_features:
        raise ValueError(
            f"correlated_groups must be in [0, n_features={n_features}], got {correlated_groups}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if p_decay < 0:
        raise ValueError(f"p_decay must be >= 0, got {p_decay}")


def unit_gaussian_directions(n: int, d: int, seed: int) -> np.ndarray:
    """n random unit vectors in d dims (normalised in float64, stored float32)."""
    w = np.random.default_rng([seed, _FEATURE_STREAM]).standard_normal((n, d))
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return w.astype(np.float32)


def feature_probabilities(n: int, p_active: float, p_decay: float) -> np.ndarray:
    """Per-feature activation probabilities: all p_active, or exponentially decaying with mean
    p_active (clipped to 1, which can only lower the mean when p_active·p_decay is large)."""
    if p_decay == 0:
        return np.full(n, p_active)
    w = np.exp(-p_decay * np.arange(n) / n)
    return np.minimum(p_active * w / w.mean(), 1.0)


def random_partition(n: int, n_groups: int, seed: int) -> np.ndarray:
    """Group id of each of n features: a seeded random partition into near-equal groups."""
    perm = np.random.default_rng([seed, _GROUP_STREAM]).permutation(n)
    return (perm % n_groups).astype(np.int64)


def independent_activity(rng: np.random.Generator, probs: np.ndarray,
                         n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, feature) of the active entries of n_rows rows, feature i active w.p. probs[i].

    Cost is proportional to the number of active entries, not n_rows * n_features: candidates
    at rate max(probs) come from geometric gaps over the flattened grid, then unequal
    probabilities are thinned."""
    n = len(probs)
    p_max = float(probs.max())
    flat = _geometric_positions(rng, p_max, n_rows * n)
    flat = _thin(rng, flat, lambda f: probs[f % n], p_max, uniform=bool(np.all(probs == p_max)))
    return flat // n, flat % n


@dataclass(frozen=True)
class GroupModel:
    """Correlated activity: group g fires w.p. fire_probs[g]; then each of its members (row g of
    `members`, padded with -1) is active w.p. member_probs[g, slot] (0 on padding)."""

    fire_probs: np.ndarray  # [G]
    members: np.ndarray  # [G, max group size] int64 feature ids, -1 = padding
    member_probs: np.ndarray  # [G, max group size] float64

    @staticmethod
    def build(probs: np.ndarray, groups: np.ndarray, n_groups: int) -> GroupModel:
        """q_g = sqrt(max p in g) keeps every within-group probability p_i / q_g <= 1 while
        making group-mates co-occur ~1/q_g times more often than independent features."""
        sizes = np.bincount(groups, minlength=n_groups)
        members = np.full((n_groups, sizes.max()), -1, np.int64)
        order = np.argsort(groups, kind="stable")
        slot = np.arange(len(groups)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        members[groups[order], slot] = order
        p_max = np.zeros(n_groups)
        np.maximum.at(p_max, groups, probs)
        q = np.sqrt(p_max)
        member_probs = np.where(members >= 0, probs[members] / q[:, None], 0.0)
        return GroupModel(q, members, member_probs)

    def activity(self, rng: np.random.Generator, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, feature) of the active entries of n_rows rows. Members are drawn only for the
        (row, group) pairs whose group fired, so the cost is proportional to the output."""
        fired_row, fired_group = np.nonzero(rng.random((n_rows, len(self.fire_probs)))
                                            < self.fire_probs)
        size = self.members.shape[1]
        r_max = float(self.member_probs.max())
        flat = _geometric_positions(rng, r_max, len(fired_row) * size)
        flat = _thin(rng, flat, lambda f: self.member_probs[fired_group[f // size], f % size],
                     r_max, uniform=bool(np.all(self.member_probs == r_max)))
        pair, slot = np.divmod(flat, size)
        return fired_row[pair], self.members[fired_group[pair], slot]


def _thin(rng: np.random.Generator, flat: np.ndarray, prob_of, p_max: float,
          uniform: bool) -> np.ndarray:
    """Keep each candidate (drawn at rate p_max) with probability prob_of(flat) / p_max."""
    if uniform:
        return flat
    return flat[rng.random(len(flat)) * p_max < prob_of(flat)]


def _geometric_positions(rng: np.random.Generator, p: float, total: int) -> np.ndarray:
    """Sorted positions in [0, total) of the successes of `total` Bernoulli(p) trials."""
    if p >= 1.0:
        return np.arange(total, dtype=np.int64)
    if p <= 0.0 or total == 0:
        return np.zeros(0, np.int64)
    expected = total * p
    chunk = int(expected + 5 * np.sqrt(expected) + 16)
    pieces, last = [], -1
    while last < total:
        pos = last + np.cumsum(rng.geometric(p, size=chunk))
        pieces.append(pos)
        last = int(pos[-1])
    pos = np.concatenate(pieces)
    return pos[:np.searchsorted(pos, total)]


def draw_magnitudes(rng: np.random.Generator, kind: Magnitude, k: int) -> np.ndarray:
    """k non-negative float32 magnitudes: Uniform(0, 1] or Exp(1)."""
    if kind == "uniform":
        return 1.0 - rng.random(k, dtype=np.float32)  # (0, 1]: an active feature is never 0
    return rng.standard_exponential(k, dtype=np.float32)


def concat_codes(pieces: list[SparseCodes]) -> SparseCodes:
    """Stack row blocks of codes into one (rows in order)."""
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return SparseCodes(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    offsets = np.cumsum([0] + [len(p.feature) for p in pieces[:-1]])
    indptr = np.concatenate([pieces[0].indptr[:1]]
                            + [p.indptr[1:] + o for p, o in zip(pieces, offsets)])
    return SparseCodes(indptr, np.concatenate([p.feature for p in pieces]),
                       np.concatenate([p.value for p in pieces]))


# -- ground-truth recovery --------------------------------------------------------------------

def max_cosine_per_feature(decoder: np.ndarray, true_features: np.ndarray,
                           chunk: int = 1024) -> np.ndarray:
    """[n] for each true feature, its largest (signed) cosine similarity with any decoder row.

    Zero decoder rows have cosine 0 with everything instead of NaN (dead or pruned latents must
    not poison the metric). Processed in chunks of true features to bound memory."""
    decoder = np.asarray(decoder, np.float32)
    true_features = np.asarray(true_features, np.float32)
    if decoder.ndim != 2 or true_features.ndim != 2:
        raise ValueError(f"decoder {decoder.shape} and true_features {true_features.shape} "
                         "must both be 2-D [rows, d]")
    if decoder.shape[1] != true_features.shape[1]:
        raise ValueError(f"decoder rows have width {decoder.shape[1]} but true_features have "
                         f"width {true_features.shape[1]}")
    if decoder.shape[0] == 0:
        return np.zeros(len(true_features), np.float32)
    dec = _unit_rows(decoder)
    true = _unit_rows(true_features)
    out = np.empty(len(true), np.float32)
    for a in range(0, len(true), chunk):
        out[a:a + chunk] = (true[a:a + chunk] @ dec.T).max(axis=1)
    return out


def mmcs(decoder: np.ndarray, true_features: np.ndarray) -> float:
    """Mean max cosine similarity (Sharkey et al. 2022): the mean over TRUE features of the max
    cosine similarity between that feature and any learned decoder row [F, d].

    1.0 means every ground-truth direction is matched exactly by some latent (order and scale
    do not matter); it is not penalised by extra or duplicate latents. A random Gaussian decoder
    scores a little under sqrt(2 ln F / d) (about 0.35 for F=256, d=64)."""
    return float(max_cosine_per_feature(decoder, true_features).mean())


def _unit_rows(w: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.where(norms > 0, norms, 1.0)
