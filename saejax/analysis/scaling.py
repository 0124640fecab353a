"""Scaling laws of a sweep: reconstruction loss against dictionary size, training tokens and
compute, fitted as the SAE literature does, with bootstrap intervals.

The law is L(x) = a·x^(−α), or with an irreducible term L(x) = a·x^(−α) + c, fitted by least
squares on log L (every measurement weighs the same in relative terms, as on the log-log plots
these laws are read from). The irreducible term is kept only where the data supports it
(`fit_power_law(irreducible="auto")`: measurements at 5 or more distinct x, and the
small-sample AIC of the 3-parameter form at least `AIC_MARGIN` below the 2-parameter one).
Intervals are percentile bootstraps over the measurements (pairs resampled with replacement,
seeded), so repeated seeds at one size count as the repeated measurements they are. On few
measurements they run a little narrow: on 18 measurements of a known law the 95% interval of α
held the truth in 87.5% of 200 draws (tests/test_scaling.py checks a floor on this).

`scaling_report` groups a sweep's members by everything but the varied axis and the seeds (so
each group is at fixed sparsity: the same k, target L0 or λ) and fits, per group: the loss
against n_features (Gao et al. 2024's L(n) at fixed k), against tokens when members differ in
tokens, and against compute (∝ n_features × tokens) on the lower envelope when both vary
(Anthropic's loss-against-compute frontier). Where a group varies both the size and the
sparsity it also fits log L = log a − α_n·log n − α_k·log L0, the separable power law in both
(Gao et al. fit a joint L(n, k); L0 is the measured one, k itself for TopK).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from saejax.analysis.report import (check_rows, is_seed_key, is_size_key, metric, new_figure,
                                    save_figure, setting_key, setting_label,
                                    varying_keys)
from saejax.atomic import json_safe, write_json_atomic, write_text_atomic

AIC_MARGIN = 2.0
"""The irreducible term is kept (irreducible="auto") only when it lowers the AICc by more than
this (a difference below 2 is conventionally no evidence either way)."""
MIN_DISTINCT_X_IRREDUCIBLE = 5
"""irreducible="auto" considers c only with measurements at this many distinct x: 3 parameters
fitted to the means at 4 x would leave one degree of freedom to tell a bend from noise (on pure
power laws with 1% noise, 4 sizes x 2 seeds, it kept a spurious c in 2% of draws)."""
MIN_DISTINCT_X_REPORT = 3
"""scaling_report fits an axis only where a group has measurements at this many distinct x: an
exponent from two sizes has no check on the law's form."""
ALPHA_BOUND = 10.0
"""|α| bound of the 3-parameter fit (keeps x^(−α) finite; SAE loss exponents are far below)."""
TOKEN_KEYS = ("train.steps", "train.batch_size")
"""Hyperparameters that set the training tokens (the tokens axis carries them)."""
SPARSITY_KEYS = ("k", "target_l0", "l1_coefficient", "l0_coefficient")
"""Last dotted components of the hyperparameters that set the sparsity (k, target L0, λ)."""


@dataclasses.dataclass(frozen=True)
class Published:
    """A published SAE scaling law to set beside a fit, with where it was read."""

    source: str
    url: str
    law: str
    values: dict
    note: str


PUBLISHED = (
    Published(
        source="Gao et al. 2024, Scaling and evaluating sparse autoencoders (OpenAI), Fig. 1 left",
        url="https://arxiv.org/abs/2406.04093",
        law="L(C) = c + a·C^(−α): normalised MSE against compute C (as a fraction of GPT-4 "
            "pretraining compute), TopK SAEs on GPT-4 activations at the best size per budget",
        values={"c": 0.09, "a": 0.056, "alpha": 0.084},
        note="Read from the figure's inset 'L = 0.09 + 0.056 C^0.084' in the paper's text as "
             "extracted at huggingface.co/datasets/pdf2dataset/9766b698918722dec3ea5ffdb88c3cbb "
             "(the extraction drops the minus sign of the exponent; the loss falls with C)."),
    Published(
        source="Gao et al. 2024, Fig. 1 right: L(n, k) at convergence",
        url="https://arxiv.org/abs/2406.04093",
        law="normalised MSE at convergence, jointly in the number of latents n and k",
        values={},
        note="The paper fits a joint law L(n, k) (its Fig. 1 right); its form and "
             "coefficients could not be read from the stored copies searched here, so none "
             "are given: compare with the paper itself."),
    Published(
        source="Templeton et al. 2024, Scaling Monosemanticity (Anthropic), Scaling laws",
        url="https://transformer-circuits.pub/2024/scaling-monosemanticity/index.html",
        law="loss against compute; compute-optimal number of features and of training steps",
        values={},
        note="Reported qualitatively in what was found: the loss decreases approximately as a "
             "power law in compute, the compute-optimal features and steps each grow "
             "approximately as a power law of compute, features faster than steps. No "
             "numerical exponent was found to quote."),
)
"""Published laws for scaling.md (see each note for how far the numbers were verified)."""


# -- one power law -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """L(x) = a·x^(−alpha) + c (c = 0 for form "power"), with 95% percentile bootstrap
    intervals. residual: RMS of log L − log L̂ (≈ relative error); aicc: each fitted form's
    small-sample AIC on log L (NaN where too few points); reason: why this form."""

    form: str
    a: float
    alpha: float
    c: float
    a_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    c_ci: tuple[float, float]
    residual: float
    n: int
    n_boot: int
    aicc: dict
    reason: str

    def __call__(self, x):
        return self.a * np.asarray(x, float) ** -self.alpha + self.c


def _check_xy(x, y, what: str = "x") -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if len(x) != len(y):
        raise ValueError(f"{what} and the loss differ in length ({len(x)} vs {len(y)})")
    if len(x) < 3:
        raise ValueError(f"a power-law fit needs at least 3 measurements, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{what} and the loss must be finite (NaN/Inf given)")
    for v, name in ((x, what), (y, "the loss")):
        if (v <= 0).any():
            raise ValueError(f"{name} must be positive for a log-log fit, got {v.min():g}")
    if len(np.unique(x)) < 2:
        raise ValueError(f"all {len(x)} measurements are at one {what} ({x[0]:g}): no slope")
    return x, y


def _aicc(rss: float, n: int, k: int) -> float:
    """Small-sample AIC of a least-squares fit with k parameters (Gaussian residuals)."""
    if n - k - 1 <= 0:
        return math.nan
    return n * math.log(max(rss / n, 1e-300)) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _fit_power(lx: np.ndarray, ly: np.ndarray) -> tuple[np.ndarray, float]:
    """(log a, α) of log y = log a − α·log x by linear least squares, and the RSS."""
    design = np.c_[np.ones_like(lx), -lx]
    p, *_ = np.linalg.lstsq(design, ly, rcond=None)
    r = ly - design @ p
    return p, float(r @ r)


def _fit_floor(lx: np.ndarray, ly: np.ndarray, starts: Iterable) -> tuple[np.ndarray, float]:
    """(log a, α, c) of log y = log(a·x^(−α) + c), c ≥ 0, by nonlinear least squares from
    each start (the best kept), and the RSS."""
    from scipy.optimize import least_squares  # noqa: PLC0415

    def residual(p):
        return np.log(np.exp(p[0] - p[1] * lx) + p[2]) - ly

    def jac(p):
        e = np.exp(p[0] - p[1] * lx)
        s = e + p[2]
        return np.c_[e / s, -lx * e / s, 1.0 / s]

    lo, hi = [-np.inf, -ALPHA_BOUND, 0.0], [np.inf, ALPHA_BOUND, np.inf]
    best = None
    for p0 in starts:
        p0 = np.clip(np.asarray(p0, float), [-1e300, -ALPHA_BOUND + 1e-9, 0.0],
                     [1e300, ALPHA_BOUND - 1e-9, np.inf])
        sol = least_squares(residual, p0, jac=jac, bounds=(lo, hi), method="trf")
        if best is None or sol.cost < best.cost:
            best = sol
    return best.x, float(2 * best.cost)


def _floor_starts(lx: np.ndarray, y: np.ndarray) -> list:
    """Starts for the 3-parameter fit: c at fractions of min(y), a and α from the linear fit
    of log(y − c)."""
    starts = []
    for frac in (0.0, 0.5, 0.9):
        c0 = frac * y.min()
        (la, al), _ = _fit_power(lx, np.log(y - c0))
        starts.append((la, al, c0))
    return starts


def _params(form: str, lx, y, ly, starts=None) -> tuple[np.ndarray, float]:
    if form == "power":
        (la, al), rss = _fit_power(lx, ly)
        return np.array([la, al, 0.0]), rss
    return _fit_floor(lx, ly, starts if starts is not None else _floor_starts(lx, y))


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] indices of bootstrap resamples of n measurements (with replacement)."""
    return np.random.default_rng(seed).integers(0, n, (n_boot, n))


def _linear_boot(design: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Least-squares coefficients [B', P] of y ≈ design @ p on each resample of idx [B, n], all
    at once through the normal equations; resamples that cannot determine p are left out."""
    d, t = design[idx], y[idx]                                   # [B, n, P], [B, n]
    gram = np.einsum("bnp,bnq->bpq", d, d)
    ok = np.linalg.matrix_rank(gram) == design.shape[1] if len(idx) else np.zeros(0, bool)
    return np.linalg.solve(gram[ok], np.einsum("bnp,bn->bp", d[ok], t[ok])[..., None])[..., 0]


def _ci(samples: np.ndarray) -> tuple[float, float]:
    if len(samples) == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return (float(lo), float(hi))


def fit_power_law(x, y, irreducible: bool | str = "auto", *, n_boot: int = 1000,
                  seed: int = 0) -> PowerLawFit:
    """Fit L(x) = a·x^(−α) (+ c) to measurements (x_i, y_i), both positive; at least 3 of them
    at 2 distinct x (ValueError otherwise, naming the problem).

    irreducible: False fits a·x^(−α); True also c ≥ 0 (needs ≥ 4 measurements at ≥ 3 distinct
    x); "auto" fits both where there are measurements at ≥ 5 distinct x and keeps c only if
    it lowers the AICc by more than AIC_MARGIN. n_boot resamples (seeded) give the intervals.
    """
    x, y = _check_xy(x, y)
    if irreducible not in (True, False, "auto"):
        raise ValueError(f'irreducible must be True, False or "auto", got {irreducible!r}')
    n, distinct = len(x), len(np.unique(x))
    if irreducible is True and (n < 4 or distinct < 3):
        raise ValueError(f"the irreducible term needs at least 4 measurements at 3 distinct x, "
                         f"got {n} at {distinct}")
    x0 = float(np.exp(np.log(x).mean()))  # fit in units of the geometric mean x: conditioning
    lx, ly = np.log(x / x0), np.log(y)

    fits, aicc = {}, {}
    if irreducible is not True:
        fits["power"] = _params("power", lx, y, ly)
        aicc["power"] = _aicc(fits["power"][1], n, 2)
    enough = distinct >= MIN_DISTINCT_X_IRREDUCIBLE
    if irreducible is True or (irreducible == "auto" and enough):
        fits["power+c"] = _params("power+c", lx, y, ly)
        aicc["power+c"] = _aicc(fits["power+c"][1], n, 3)

    if irreducible is True:
        form, reason = "power+c", "irreducible=True: the irreducible term was asked for"
    elif irreducible is False:
        form, reason = "power", "irreducible=False: a pure power law was asked for"
    elif not enough:
        form, reason = "power", (f"measurements at {distinct} distinct x: too few to fit an "
                                 f"irreducible term as well (needs ≥ "
                                 f"{MIN_DISTINCT_X_IRREDUCIBLE})")
    else:
        with_c, without = aicc["power+c"], aicc["power"]
        c_fit = fits["power+c"][0][2]
        if c_fit > 1e-9 * y.min() and with_c < without - AIC_MARGIN:
            form = "power+c"
            reason = f"AICc {with_c:.1f} with c < {without:.1f} without − {AIC_MARGIN:g}"
        else:
            form = "power"
            reason = ("the fitted c is 0" if c_fit <= 1e-9 * y.min() else
                      f"AICc {with_c:.1f} with c is not below {without:.1f} without − "
                      f"{AIC_MARGIN:g}")
    p, rss = fits[form]

    # Bootstrap: refit the chosen form on measurements resampled with replacement; the
    # 3-parameter form one resample at a time, started from the full fit (the resamples are near
    # it, and one start keeps 1000 refits cheap), the linear one all at once.
    idx = _resamples(n, n_boot, seed)
    if form == "power":
        samples = _linear_boot(np.c_[np.ones(n), -lx], ly, idx)
        samples = np.c_[samples, np.zeros(len(samples))]
    else:
        samples = [_params(form, lx[i], y[i], ly[i], starts=[p])[0] for i in idx
                   if len(np.unique(x[i])) >= 3]
    s = np.array(samples).reshape(-1, 3)
    to_a = lambda la, al: np.exp(la) * x0 ** al  # noqa: E731  back to the units of x
    return PowerLawFit(
        form=form, a=float(to_a(p[0], p[1])), alpha=float(p[1]), c=float(p[2]),
        a_ci=_ci(to_a(s[:, 0], s[:, 1])), alpha_ci=_ci(s[:, 1]),
        c_ci=_ci(s[:, 2]) if form == "power+c" else (0.0, 0.0),
        residual=math.sqrt(rss / n), n=n, n_boot=len(s), aicc=aicc, reason=reason)


# -- joint law in size and sparsity --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class JointFit:
    """L(n, k) = a·n^(−alpha_n)·k^(−alpha_k), fitted on log L, with 95% bootstrap intervals;
    residual: RMS of the log residuals."""

    a: float
    alpha_n: float
    alpha_k: float
    a_ci: tuple[float, float]
    alpha_n_ci: tuple[float, float]
    alpha_k_ci: tuple[float, float]
    residual: float
    n: int
    n_boot: int

    def __call__(self, n, k):
        n, k = np.asarray(n, float), np.asarray(k, float)
        return self.a * n ** -self.alpha_n * k ** -self.alpha_k


def fit_joint_power_law(n, k, y, *, n_boot: int = 1000, seed: int = 0) -> JointFit:
    """Fit log L = log a − α_n·log n − α_k·log k (n latents, k active per token) by least
    squares; at least 4 measurements with ≥ 2 distinct n and ≥ 2 distinct k, not collinear."""
    n_, y = _check_xy(n, y, "n")
    k_, _ = _check_xy(k, y, "k")
    if len(n_) < 4:
        raise ValueError(f"a joint fit in n and k needs at least 4 measurements, got {len(n_)}")
    design = np.c_[np.ones(len(y)), -np.log(n_), -np.log(k_)]
    if np.linalg.matrix_rank(design) < 3:
        raise ValueError("n and k vary together (collinear in log space): their exponents "
                         "cannot be told apart")
    ly = np.log(y)
    p, *_ = np.linalg.lstsq(design, ly, rcond=None)
    r = ly - design @ p
    samples = _linear_boot(design, ly, _resamples(len(y), n_boot, seed))
    s = np.array(samples).reshape(-1, 3)
    return JointFit(a=float(np.exp(p[0])), alpha_n=float(p[1]), alpha_k=float(p[2]),
                    a_ci=_ci(np.exp(s[:, 0])), alpha_n_ci=_ci(s[:, 1]), alpha_k_ci=_ci(s[:, 2]),
                    residual=float(math.sqrt(r @ r / len(y))), n=len(y), n_boot=len(s))


# -- a sweep's scaling report --------------------------------------------------------------------

def _is_token_key(key: str) -> bool:
    return key in TOKEN_KEYS


def _is_sparsity_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in SPARSITY_KEYS


def _is_scale_key(key: str) -> bool:
    """Size and token fields: the axes carry them (as the n_features and tokens of a row)."""
    return is_size_key(key) or _is_token_key(key)


AXES = {
    # axis: (x of a row, what is held fixed within a group (labelled when it varies), x label)
    "n_features": (lambda r: r["n_features"], "tokens", "n_features (latents)"),
    "tokens": (lambda r: r["tokens"], "n_features", "training tokens"),
    "compute": (lambda r: r["n_features"] * r["tokens"], None,
                "compute ∝ n_features × tokens (12·d_in FLOPs each)"),
}


def _groups(rows: list[dict], drop, fixed: str | None) -> dict[str, list[dict]]:
    """Rows grouped by their hyperparameters other than seeds and those `drop` marks, and by
    the row field `fixed`; keyed by a label naming what tells the groups apart."""
    varying = varying_keys(rows)  # a field constant over the sweep tells no groups apart
    fixed_varies = fixed is not None and len({r[fixed] for r in rows}) > 1
    out: dict[str, list[dict]] = {}
    for r in rows:
        hp = setting_key(r["hparams"], lambda k: k not in varying or is_seed_key(k) or drop(k))
        parts = ([setting_label(hp)] if hp else []) + ([f"{fixed}={r[fixed]}"] if fixed_varies
                                                       else [])
        out.setdefault(",".join(parts) or "all", []).append(r)
    return out


def _axis_fits(rows, axis, name, irreducible, n_boot, seed, fits, skipped) -> None:
    x_of, fixed, _ = AXES[axis]
    for label, members in _groups(rows, _is_scale_key, fixed).items():
        x = np.array([x_of(r) for r in members], float)
        y = np.array([metric(r, name) for r in members])
        names = [r["member"] for r in members]
        if axis == "compute":  # the lower envelope: the best member at each budget
            best = {}
            for xi, yi, m in zip(x, y, names, strict=True):
                if xi not in best or yi < best[xi][0]:
                    best[xi] = (yi, m)
            x = np.array(sorted(best))
            y = np.array([best[v][0] for v in x])
            names = [best[v][1] for v in x]
        if len(np.unique(x)) < MIN_DISTINCT_X_REPORT:
            skipped.append({"axis": axis, "group": label,
                            "why": f"{len(np.unique(x))} distinct {axis} value(s); a fit needs "
                                   f"≥ {MIN_DISTINCT_X_REPORT}"})
            continue
        fit = fit_power_law(x, y, irreducible, n_boot=n_boot, seed=seed)
        fits.append({"axis": axis, "group": label, "members": names, "x": x.tolist(),
                     "y": y.tolist(), "fit": fit})


def _joint_fits(rows, name, n_boot, seed, joint, skipped) -> None:
    def drop(k):
        return _is_scale_key(k) or _is_sparsity_key(k)

    for label, members in _groups(rows, drop, "tokens").items():
        settings = {setting_key(r["hparams"], lambda k: not _is_sparsity_key(k)) for r in members}
        sizes = {r["n_features"] for r in members}
        if len(settings) < 2 or len(sizes) < 2:
            continue  # one sparsity or one size: the per-size fits say it all
        n = np.array([r["n_features"] for r in members], float)
        k = np.array([metric(r, "l0") for r in members])
        y = np.array([metric(r, name) for r in members])
        ok = np.isfinite(k) & (k > 0)
        try:
            fit = fit_joint_power_law(n[ok], k[ok], y[ok], n_boot=n_boot, seed=seed)
        except ValueError as e:
            skipped.append({"axis": "n_features × L0", "group": label, "why": str(e)})
            continue
        joint.append({"group": label, "fit": fit,
                      "members": [r["member"] for r, o in zip(members, ok, strict=True) if o]})


def _fmt_ci(v: float, ci: tuple[float, float]) -> str:
    return f"{v:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]"


def _markdown(name, fits, joint, skipped, excluded) -> str:
    lines = ["# Scaling laws", "",
             f"Loss: `{name}`. L(x) = a·x^(−α) (+ c), least squares on log L; 95% percentile "
             "bootstrap intervals over the measurements; the irreducible term c only where "
             "the data supports it (column *form*: why).", ""]
    if fits:
        lines += ["| against | group | points | α (95% CI) | a (95% CI) | c (95% CI) | "
                  "RMS log residual | form |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for f in fits:
            fit = f["fit"]
            c = _fmt_ci(fit.c, fit.c_ci) if fit.form == "power+c" else "–"
            lines.append(f"| {f['axis']} | {f['group']} | {fit.n} | "
                         f"{_fmt_ci(fit.alpha, fit.alpha_ci)} | {_fmt_ci(fit.a, fit.a_ci)} | {c} "
                         f"| {fit.residual:.3g} | {fit.form}: {fit.reason} |")
        lines.append("")
    else:
        lines += ["No axis had enough distinct values to fit.", ""]
    if joint:
        lines += ["## Joint law in size and sparsity", "",
                  "log L = log a − α_n·log n − α_k·log L0 (n = n_features, L0 measured): the "
                  "separable power law in size and sparsity.", "",
                  "| group | points | α_n (95% CI) | α_k (95% CI) | a (95% CI) | "
                  "RMS log residual |", "| --- | --- | --- | --- | --- | --- |"]
        for j in joint:
            fit = j["fit"]
            lines.append(f"| {j['group']} | {fit.n} | {_fmt_ci(fit.alpha_n, fit.alpha_n_ci)} | "
                         f"{_fmt_ci(fit.alpha_k, fit.alpha_k_ci)} | {_fmt_ci(fit.a, fit.a_ci)} | "
                         f"{fit.residual:.3g} |")
        lines.append("")
    if skipped or excluded:
        lines += ["## Not fitted", ""]
        lines += [f"- {s['axis']}, {s['group']}: {s['why']}" for s in skipped]
        lines += [f"- member {m}: {name} is not a finite positive number" for m in excluded]
        lines.append("")
    lines += ["## Published, for comparison", "",
              "| source | law | values | note |", "| --- | --- | --- | --- |"]
    for p in PUBLISHED:
        values = ", ".join(f"{k} = {v:g}" for k, v in p.values.items()) or "–"
        lines.append(f"| [{p.source}]({p.url}) | {p.law} | {values} | {p.note} |")
    return "\n".join(lines) + "\n"


def _figure(fits: list[dict], name: str, path: Path) -> None:
    from matplotlib.ticker import NullFormatter  # noqa: PLC0415

    axes_used = list(dict.fromkeys(f["axis"] for f in fits))
    fig = new_figure(6 * len(axes_used), 4.8)
    panels = np.atleast_1d(fig.subplots(1, len(axes_used)))
    for ax, axis in zip(panels, axes_used, strict=True):
        for i, f in enumerate(x for x in fits if x["axis"] == axis):
            fit, c = f["fit"], f"C{i % 10}"
            x = np.array(f["x"])
            grid = np.geomspace(x.min(), x.max(), 100)
            lo, hi = fit.alpha_ci
            ax.scatter(x, f["y"], c=c, s=16)
            ax.plot(grid, fit(grid), "-", c=c,
                    label=f"{f['group']}: α = {fit.alpha:.3f} [{lo:.3f}, {hi:.3f}]"
                          + (f", c = {fit.c:.3g}" if fit.form == "power+c" else ""))
            if fit.form == "power+c":
                ax.axhline(fit.c, c=c, ls=":", lw=0.8)
        ax.set_xscale("log", base=2 if axis == "n_features" else 10)
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        ax.set_xlabel(AXES[axis][2])
        ax.set_ylabel(name)
        ax.set_title(f"{name} against {axis}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def scaling_report(rows: Iterable[Mapping], out_dir: str | Path, *, metric_name: str = "fvu",
                   irreducible: bool | str = "auto", n_boot: int = 1000, seed: int = 0) -> dict:
    """Fit the sweep's scaling laws (module docstring) of `metric_name` (fvu: Gao et al.'s
    normalised MSE; or mse, or any other positive metric) and write out_dir/scaling.md,
    scaling.json and, when anything was fitted, scaling.png.

    Returns {"fits": [{"axis", "group", "members", "x", "y", "fit": PowerLawFit}],
    "joint": [{"group", "members", "fit": JointFit}], "skipped": [{"axis", "group", "why"}],
    "excluded": [members without a finite positive loss], "markdown", "json", "figure"
    (None when nothing was fitted)}.
    """
    rows = check_rows(list(rows))
    def ok(r):
        v = metric(r, metric_name)
        return math.isfinite(v) and v > 0

    usable = [r for r in rows if ok(r)]
    excluded = [r["member"] for r in rows if not ok(r)]
    fits, joint, skipped = [], [], []
    axes = ["n_features"]
    if len({r["tokens"] for r in usable}) > 1:
        axes.append("tokens")
        if len({r["n_features"] for r in usable}) > 1:
            axes.append("compute")
    for axis in axes:
        _axis_fits(usable, axis, metric_name, irreducible, n_boot, seed, fits, skipped)
    _joint_fits(usable, metric_name, n_boot, seed, joint, skipped)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / "scaling.md", out / "scaling.json", out / "scaling.png"
    write_text_atomic(md, _markdown(metric_name, fits, joint, skipped, excluded))

    def as_json(items):
        return [{**i, "fit": dataclasses.asdict(i["fit"])} for i in items]

    write_json_atomic(js, json_safe({
        "metric": metric_name, "fits": as_json(fits), "joint": as_json(joint),
        "skipped": skipped, "excluded": excluded,
        "published": [dataclasses.asdict(p) for p in PUBLISHED]}))
    figure = None
    if fits:
        _figure(fits, metric_name, png)
        figure = str(png)
    return {"fits": fits, "joint": joint, "skipped": skipped, "excluded": excluded,
            "markdown": str(md), "json": str(js), "figure": figure}
