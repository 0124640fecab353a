"""How alike two sets of features are over the same tokens, and each feature's best match.

A *feature set* turns a batch of site activations into features: an SAE (its encoder) or the
site's raw neurons. Two sets may read the same LM (cross-seed, cross-size) or two LMs on the same
tokens (universality across models, and the neuron baseline: the paper finds features match
across models far better than neurons do).

For every pair (i in A, j in B), over the counted positions of one pass over text:

  correlation     Pearson correlation of a_i and b_j over tokens (the paper's universality
                  measure). Undefined (NaN) where either is constant, e.g. a dead feature.
  masked cosine   cosine of a_i and b_j over U = {tokens where a_i or b_j fires}, a feature
                  *firing* where its activation is > 0 (the paper's feature-splitting measure).
  decoder cosine  cosine of two SAEs' decoder directions (W_dec rows); no data needed.

Masked cosine needs no mask for non-negative activations: off U both activations are 0, so the
tokens outside U add nothing to Σ a·b, Σ a² or Σ b², and the masked cosine is the plain cosine
over all tokens. That holds for SAE features and ReLU neurons. It fails for signed activations
(GELU neurons, the residual stream): tokens where both are negative count in the plain cosine and
not in U. For such sets the statistics also accumulate the sums over U itself, split into the
disjoint {a_i > 0} and {a_i <= 0, b_j > 0} (three more [F_A, F_B] matmuls, no subtraction), and
the union definition is applied exactly.

Sufficient statistics, accumulated batch by batch on device in one jitted step:
counts n, per-feature means and centered sums of squares, the centered co-moment
C = Σ (a - ā)(b - b̄)ᵀ [F_A, F_B], firing and co-firing counts, and (signed sets) the three
union sums. Batches are merged with Chan et al.'s parallel update, so the correlation does not
suffer the cancellation of Σab − ΣaΣb/n in float32; raw sums for the cosine are recovered as
C + n·ā b̄ᵀ, whose error is a few float32 ulps of the cosine (Cauchy-Schwarz bounds both terms
by sqrt(Σa² Σb²)). Matmuls run at HIGHEST precision: the GPU default (TF32) keeps only about
three significant digits.

Memory is a handful of [F_A, F_B] float32/int32 matrices: 16k x 16k is ~1 GiB each (2 for
non-negative sets, 5 for signed ones, plus transients in the step and when finishing). To go
beyond, split B into feature chunks and make one pass per chunk (e.g. a FeatureSet whose encode
slices the SAE's W_enc/b_enc columns): the statistics of a pair never look at other columns, so
the chunks' results are exactly the columns of the full matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saejax.eval.trained import TrainedSAE

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
MEASURES = ("correlation", "masked_cosine")


# -- feature sets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSet:
    """Something that turns site activations x [N, d_in] into features [N, n_features]."""

    name: str
    lm_path: str
    """The LM whose activations it reads (HF directory or hub id)."""
    site: str
    """Hook site, e.g. blocks.0.mlp.hook_post."""
    d_in: int
    n_features: int
    encode: Callable[[Any, jax.Array], jax.Array]
    """(params, x [N, d_in]) -> [N, n_features] float32; pure, traced inside the jitted step."""
    params: Any = None
    """Passed to `encode` as a jit argument (not baked into the compiled step)."""
    nonnegative: bool = True
    """Every activation is >= 0 (checked on the data): then masked cosine needs no correction."""
    decoder: jax.Array | None = None
    """[n_features, d_in] decoder directions (SAEs); None for neurons."""


def sae_features(sae: TrainedSAE) -> FeatureSet:
    """An SAE's features (ReLU / TopK: non-negative)."""
    return FeatureSet(sae.name, sae.lm_path, sae.site, sae.d_in, sae.n_features, sae.encode,
                      sae.params, nonnegative=True, decoder=sae.params["W_dec"])


def _identity(params, x: jax.Array) -> jax.Array:
    del params
    return x.astype(F32)


def neuron_features(lm_path: str, site: str, d: int, name: str | None = None) -> FeatureSet:
    """The site's raw activations as d features. Non-negative only for the MLP output of a
    ReLU (or ReLU²), non-gated MLP; anything else is treated as signed."""
    from saejax.lm import lm_config  # noqa: PLC0415 (reads config.json only)

    cfg = lm_config(lm_path)
    nonneg = (site.endswith("mlp.hook_post") and cfg.act in ("relu", "relu2")
              and not cfg.gated_mlp)
    return FeatureSet(name or f"neurons:{site}", lm_path, site, d, d, _identity,
                      nonnegative=nonneg)


# -- streaming statistics ------------------------------------------------------------------------


def init_stats(fa: int, fb: int, signed: bool = False) -> dict[str, jax.Array]:
    """Empty statistics for F_A x F_B features (signed: also the union-mask corrections)."""
    z = lambda *s: jnp.zeros(s, F32)  # noqa: E731
    state = {"n": jnp.zeros((), jnp.int32), "mean_a": z(fa), "mean_b": z(fb), "m2_a": z(fa),
             "m2_b": z(fb), "c": z(fa, fb), "fires_a": jnp.zeros(fa, jnp.int32),
             "fires_b": jnp.zeros(fb, jnp.int32), "cofires": jnp.zeros((fa, fb), jnp.int32),
             "min_a": jnp.full((), jnp.inf, F32), "min_b": jnp.full((), jnp.inf, F32)}
    if signed:
        state.update(u_ab=z(fa, fb), u_aa=z(fa, fb), u_bb=z(fa, fb), pos_aa=z(fa), pos_bb=z(fb))
    return state


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    """xᵀ y at full float32 precision: [N, P], [N, Q] -> [P, Q]."""
    return jnp.matmul(x.T, y, precision=HIGHEST)


def update_stats(state: dict, a: jax.Array, b: jax.Array, w: jax.Array) -> dict:
    """Add one batch: a [N, F_A], b [N, F_B], w [N] 1.0 for counted positions, 0.0 otherwise.

    Pure and jit-friendly. Means and co-moments are merged with the parallel (Chan et al.)
    update: with n0 old and nb new positions and δ = batch mean − old mean,
    M2 += M2_batch + δ² n0 nb / n and C += C_batch + δa δbᵀ n0 nb / n.
    """
    a, b, w = a.astype(F32), b.astype(F32), w.astype(F32)
    nb = w.sum()
    n0 = state["n"].astype(F32)
    mu_a, mu_b = (w @ a) / jnp.maximum(nb, 1.0), (w @ b) / jnp.maximum(nb, 1.0)
    da, db = a - mu_a, b - mu_b
    dwa = da * w[:, None]  # w is 0/1, so weighting one side weights the product
    delta_a, delta_b = mu_a - state["mean_a"], mu_b - state["mean_b"]
    frac = nb / jnp.maximum(n0 + nb, 1.0)  # nb / n
    fire_a, fire_b = (a > 0).astype(F32) * w[:, None], (b > 0).astype(F32)
    out = {
        "n": state["n"] + nb.astype(jnp.int32),
        "mean_a": state["mean_a"] + delta_a * frac,
        "mean_b": state["mean_b"] + delta_b * frac,
        "m2_a": state["m2_a"] + w @ (da * da) + delta_a**2 * n0 * frac,
        "m2_b": state["m2_b"] + w @ (db * db) + delta_b**2 * n0 * frac,
        "c": state["c"] + _mm(dwa, db) + jnp.outer(delta_a, delta_b) * (n0 * frac),
        "fires_a": state["fires_a"] + fire_a.sum(0).astype(jnp.int32),
        "fires_b": state["fires_b"] + (fire_b * w[:, None]).sum(0).astype(jnp.int32),
        # 0/1 products: exact in float32 up to 2^24 positions per batch.
        "cofires": state["cofires"] + _mm(fire_a, fire_b).astype(jnp.int32),
        "min_a": jnp.minimum(state["min_a"], jnp.where(w[:, None] > 0, a, jnp.inf).min()),
        "min_b": jnp.minimum(state["min_b"], jnp.where(w[:, None] > 0, b, jnp.inf).min()),
    }
    if "u_ab" in state:
        # Sums over U = {a_i > 0} + {a_i <= 0, b_j > 0} (and the mirror image for Σ b²): every
        # term but the cross products is >= 0, so nothing cancels.
        pos_a, pos_b = a * fire_a, b * fire_b  # fire_a carries w
        off_a, off_b = (a <= 0).astype(F32) * w[:, None], (b <= 0).astype(F32)
        out.update(u_ab=state["u_ab"] + _mm(pos_a, b) + _mm(a * off_a, pos_b),
                   u_aa=state["u_aa"] + _mm(a * a * off_a, fire_b),
                   u_bb=state["u_bb"] + _mm(fire_a, b * b * off_b),
                   pos_aa=state["pos_aa"] + (pos_a * a).sum(0),
                   pos_bb=state["pos_bb"] + (pos_b * b * w[:, None]).sum(0))
    return out


def _ratio(num: jax.Array, den2: jax.Array) -> jax.Array:
    """num / sqrt(den2), NaN where den2 <= 0 (undefined: a constant or never-firing feature)."""
    ok = den2 > 0
    return jnp.where(ok, num / jnp.sqrt(jnp.where(ok, den2, 1.0)), jnp.nan)


@jax.jit
def _correlation(s: dict) -> jax.Array:
    return _ratio(s["c"], s["m2_a"][:, None] * s["m2_b"][None, :])


@jax.jit
def _masked_cosine(s: dict) -> jax.Array:
    if "u_ab" in s:  # signed: the sums over the union were accumulated as such
        aa = s["pos_aa"][:, None] + s["u_aa"]
        bb = s["pos_bb"][None, :] + s["u_bb"]
        return jnp.clip(_ratio(s["u_ab"], aa * bb), -1.0, 1.0)
    # Non-negative: the union sums are the plain sums, recovered from the merged moments.
    n = s["n"].astype(F32)
    ab = s["c"] + n * jnp.outer(s["mean_a"], s["mean_b"])
    aa = (s["m2_a"] + n * s["mean_a"] ** 2)[:, None]
    bb = (s["m2_b"] + n * s["mean_b"] ** 2)[None, :]
    return jnp.clip(_ratio(ab, aa * bb), -1.0, 1.0)


@dataclass(frozen=True)
class Similarity:
    """Finished statistics of one pair of feature sets (arrays on device)."""

    names: tuple[str, str]
    state: dict[str, jax.Array]

    def __post_init__(self):
        if not self.signed:
            for side, name in zip("ab", self.names):
                low = float(self.state[f"min_{side}"])
                if low < 0:
                    raise ValueError(
                        f"feature set {name!r} was declared non-negative but has activation "
                        f"{low:g} < 0: accumulate it with signed statistics (nonnegative=False)")

    @property
    def signed(self) -> bool:
        return "u_ab" in self.state

    @property
    def n_tokens(self) -> int:
        """Counted positions."""
        return int(self.state["n"])

    @property
    def fires_a(self) -> np.ndarray:
        """[F_A] counted positions where each feature of A is > 0."""
        return np.asarray(self.state["fires_a"])

    @property
    def fires_b(self) -> np.ndarray:
        return np.asarray(self.state["fires_b"])

    @property
    def cofires(self) -> jax.Array:
        """[F_A, F_B] positions where both fire."""
        return self.state["cofires"]

    def correlation(self) -> jax.Array:
        """[F_A, F_B] Pearson correlation over counted positions; NaN where undefined."""
        return _correlation(self.state)

    def masked_cosine(self) -> jax.Array:
        """[F_A, F_B] cosine over the tokens where either fires; NaN where either is all zero
        there (for non-negative sets: where either never fires)."""
        return _masked_cosine(self.state)

    def matrix(self, measure: str) -> jax.Array:
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        return self.correlation() if measure == "correlation" else self.masked_cosine()

    def best_matches(self, measure: str, min_fires: int) -> tuple[BestMatches, BestMatches]:
        """(A -> B, B -> A): each feature's best match on the other side, among features that
        fire at least `min_fires` times (the others are not alive and get no match)."""
        m = self.matrix(measure)
        alive_a, alive_b = self.fires_a >= min_fires, self.fires_b >= min_fires
        return (best_matches(m, alive_a, alive_b, measure, self.names),
                best_matches(m.T, alive_b, alive_a, measure, self.names[::-1]))


# -- best matches --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BestMatches:
    """For each feature of `source`, its best match in `target`."""

    source: str
    target: str
    measure: str
    index: np.ndarray
    """[F_source] int: the best match's id; -1 for a feature that is not alive."""
    value: np.ndarray
    """[F_source] float: the similarity to it; NaN for a feature that is not alive."""
    alive: np.ndarray
    """[F_source] bool: features that count (fired often enough)."""

    def summary(self) -> dict:
        """Median / mean best-match value over the alive features, and how many there are."""
        v = self.value[self.alive & np.isfinite(self.value)]
        stat = (lambda f: float(f(v))) if len(v) else (lambda f: None)  # noqa: E731
        return {"n_features": int(len(self.alive)), "n_alive": int(self.alive.sum()),
                "n_dead": int((~self.alive).sum()), "median": stat(np.median),
                "mean": stat(np.mean), "frac_ge_0.5": stat(lambda x: np.mean(x >= 0.5)),
                "frac_ge_0.9": stat(lambda x: np.mean(x >= 0.9))}

    def to_json(self) -> dict:
        return {"index": self.index.tolist(),
                "value": [None if not np.isfinite(x) else round(float(x), 6) for x in self.value]}


@jax.jit
def _row_best(sim: jax.Array, alive_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    masked = jnp.where(alive_b[None, :] & ~jnp.isnan(sim), sim, -jnp.inf)
    return jnp.argmax(masked, axis=1), jnp.max(masked, axis=1)


def best_matches(sim: jax.Array, alive_a: np.ndarray, alive_b: np.ndarray, measure: str,
                 names: tuple[str, str] = ("A", "B")) -> BestMatches:
    """Row-wise argmax of sim [F_A, F_B] over alive columns (NaN columns never win)."""
    sim = jnp.asarray(sim)
    if sim.shape != (len(alive_a), len(alive_b)):
        raise ValueError(f"similarity has shape {sim.shape}, alive masks give "
                         f"({len(alive_a)}, {len(alive_b)})")
    index, value = jax.device_get(_row_best(sim, jnp.asarray(alive_b, bool)))
    found = np.asarray(alive_a, bool) & np.isfinite(value)
    return BestMatches(names[0], names[1], measure, np.where(found, index, -1).astype(np.int64),
                       np.where(found, value, np.nan), np.asarray(alive_a, bool))


def decoder_cosine(w_a: jax.Array, w_b: jax.Array) -> jax.Array:
    """[F_A, F_B] cosine of decoder rows w_a [F_A, d], w_b [F_B, d]; NaN for a zero row."""
    if w_a.shape[1] != w_b.shape[1]:
        raise ValueError(f"decoders have different widths: {w_a.shape} vs {w_b.shape}")
    return _decoder_cosine(jnp.asarray(w_a, F32), jnp.asarray(w_b, F32))


@jax.jit
def _decoder_cosine(w_a: jax.Array, w_b: jax.Array) -> jax.Array:
    na, nb = jnp.linalg.norm(w_a, axis=1), jnp.linalg.norm(w_b, axis=1)
    return _ratio(jnp.matmul(w_a, w_b.T, precision=HIGHEST), (na[:, None] * nb[None, :]) ** 2)


# -- one pass over text --------------------------------------------------------------------------


def _step_fn(sets: Sequence[FeatureSet], pairs: Sequence[tuple[int, int]]):
    used = sorted({i for p in pairs for i in p})

    def step(states, params, acts, mask):
        w = mask.reshape(-1).astype(F32)
        feats = {i: sets[i].encode(params[i], acts[i].reshape(-1, acts[i].shape[-1]))
                 for i in used}
        return [update_stats(s, feats[i], feats[j], w) for s, (i, j) in zip(states, pairs)]

    return jax.jit(step, donate_argnums=0)


def stream_similarities(tokens, sets: Sequence[FeatureSet], pairs: Iterable[tuple[int, int]],
                        contexts: Sequence[int], *, batch_contexts: int = 32,
                        skip_bos: bool = True) -> list[Similarity]:
    """One pass over `contexts` of the TokenDataset `tokens`: statistics of every (A, B) pair.

    sets: feature sets (each LM is loaded once and run once per batch, whatever sets read it);
    pairs: (index of A, index of B) into sets. Every set is encoded once per batch.
    """
    from saejax.lm import load_lm  # noqa: PLC0415
    from saejax.lm.stream import site_batches  # noqa: PLC0415

    pairs = [tuple(p) for p in pairs]
    for p in pairs:
        if len(p) != 2 or not all(0 <= i < len(sets) for i in p):
            raise ValueError(f"pair {p} does not index two of the {len(sets)} feature sets")
    for s in sets:
        if not s.lm_path or not s.site:
            raise ValueError(f"feature set {s.name!r} does not say which LM and site it reads "
                             f"(lm_path={s.lm_path!r}, site={s.site!r})")
    lm_paths = list(dict.fromkeys(s.lm_path for s in sets))
    streams = [site_batches(load_lm(path), tokens,
                            sorted({s.site for s in sets if s.lm_path == path}), contexts,
                            batch_contexts=batch_contexts, skip_bos=skip_bos)
               for path in lm_paths]
    states = [init_stats(sets[i].n_features, sets[j].n_features,
                         signed=not (sets[i].nonnegative and sets[j].nonnegative))
              for i, j in pairs]
    step, params = _step_fn(sets, pairs), [s.params for s in sets]
    for batches in zip(*streams, strict=True):
        by_lm = dict(zip(lm_paths, batches))
        acts = [by_lm[s.lm_path].acts[s.site] for s in sets]
        for s, x in zip(sets, acts):
            if x.shape[-1] != s.d_in:
                raise ValueError(f"feature set {s.name!r} takes d_in={s.d_in} but {s.site} of "
                                 f"{s.lm_path} has width {x.shape[-1]}")
        states = step(states, params, acts, jnp.asarray(batches[0].mask))
    return [Similarity((sets[i].name, sets[j].name), st) for st, (i, j) in zip(states, pairs)]
