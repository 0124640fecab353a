"""The sweep report: members × (hyperparameters, metrics) as CSV and markdown, and the figures
a sweep is run for (the L0–FVU frontier, loss against dictionary size, density histograms).

Input: `rows`, one dict per sweep member, as the sweep engine summarises them:

    {"member": "l1_coefficient=2e-3,seed=1",   # short stable name
     "group": "n_features=4096",               # shape group ("" when there is one)
     "hparams": {"sae.relu.l1_coefficient": 2e-3, "train.seed": 1, ...},   # the swept fields
     "n_features": 4096, "tokens": 1024000,    # dictionary size, training tokens seen
     "metrics": {"l0", "fvu", "mse", "dead_fraction", "dense_fraction",
                 optional "loss_recovered", "kl", "ce_loss_spliced"},
     optional "log10_density": [...]}          # per-feature log10 firing frequency; -inf = never

A metric may be None or NaN (a member frozen when its loss went non-finite): it is written as
such and left out of the Pareto fronts and figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from saejax.atomic import open_atomic, write_text_atomic

METRICS = ("l0", "fvu", "mse", "dead_fraction", "dense_fraction", "loss_recovered", "kl",
           "ce_loss_spliced")
"""Metric columns in the order the tables show them (any other metric follows, sorted)."""
REQUIRED_METRICS = ("l0", "fvu", "mse", "dead_fraction", "dense_fraction")
SIZE_KEYS = ("n_features", "matryoshka.widths")
"""Dotted hyperparameters (matched as suffixes) that set the dictionary size: the `n_features`
column and the x axis of size.png carry them."""
ANNOTATE_AT_MOST = 16
"""Pareto members are labelled by name on the frontier figures when there are at most this many."""


# -- rows ----------------------------------------------------------------------------------------

def is_seed_key(key: str) -> bool:
    """A dotted hyperparameter that only reseeds (train.seed, data.seed): repeats, not settings."""
    return key.rsplit(".", 1)[-1] == "seed"


def is_size_key(key: str) -> bool:
    """A dotted hyperparameter that sets the dictionary size (`SIZE_KEYS`)."""
    return any(key == s or key.endswith("." + s) for s in SIZE_KEYS)


def check_rows(rows: Sequence[Mapping]) -> list[dict]:
    """`rows` as a list, each checked to hold what the report reads (ValueError naming the
    member and the missing key); member names unique."""
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("the sweep has no members to report")
    seen = set()
    for i, r in enumerate(rows):
        name = r.get("member")
        if not isinstance(name, str) or not name:
            raise ValueError(f"row {i} has no member name")
        if name in seen:
            raise ValueError(f"member {name!r} appears twice")
        seen.add(name)
        for key in ("n_features", "tokens", "metrics"):
            if key not in r:
                raise ValueError(f"member {name!r} has no {key!r}")
        missing = [m for m in REQUIRED_METRICS if m not in r["metrics"]]
        if missing:
            raise ValueError(f"member {name!r} lacks metrics {missing}")
        r.setdefault("group", "")
        r.setdefault("hparams", {})
    return rows


def setting_key(hparams: Mapping, drop) -> tuple:
    """The hyperparameters that are not dropped (`drop(key)` true), as a hashable sorted tuple:
    members with equal keys differ only in the dropped fields."""
    return tuple((k, _hashable(hparams[k])) for k in sorted(hparams) if not drop(k))


def varying_keys(rows: Sequence[Mapping]) -> set[str]:
    """The hyperparameters whose value differs between rows (or that some rows lack): only
    these tell settings apart in labels."""
    keys = {k for r in rows for k in r["hparams"]}
    return {k for k in keys if len({repr(r["hparams"].get(k)) for r in rows}) > 1}


def setting_label(key: tuple) -> str:
    """A setting key as `name=value,...` with each field's last dotted component ("all" when
    empty)."""
    return ",".join(f"{k.rsplit('.', 1)[-1]}={fmt_value(v)}" for k, v in key) or "all"


def fmt_value(v) -> str:
    """A hyperparameter value as written in labels and tables: floats in %g, lists as JSON."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return json.dumps(list(v))
    return str(v)


def metric(row: Mapping, name: str) -> float:
    """The row's metric as a float; NaN when absent or None."""
    v = row["metrics"].get(name)
    return math.nan if v is None else float(v)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _sortable(v) -> tuple:
    """Numbers before strings before missing values, so mixed columns sort without errors."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return (0, float(v), "")
    if v is None:
        return (2, 0.0, "")
    return (1, 0.0, fmt_value(v))


def sort_rows(rows: list[dict]) -> list[dict]:
    """By dictionary size, group, the other hyperparameters in key order, then seeds: members of
    one setting that differ only in seed end up next to each other."""
    keys = sorted({k for r in rows for k in r["hparams"]})
    rest = [k for k in keys if not is_seed_key(k)]
    seeds = [k for k in keys if is_seed_key(k)]

    def order(r):
        hp = r["hparams"]
        return (r["n_features"], r["group"], [_sortable(hp.get(k)) for k in rest],
                [_sortable(hp.get(k)) for k in seeds], r["member"])

    return sorted(rows, key=order)


# -- Pareto --------------------------------------------------------------------------------------

def pareto(points) -> np.ndarray:
    """bool [N]: which of points [N, D] are Pareto-optimal, lower better in every column (for
    the L0–FVU frontier: columns L0, FVU). A point is dominated when another is at least as good
    in every column and better in one; equal points dominate neither. Points with a NaN/Inf are
    never optimal and dominate nothing."""
    p = np.asarray(points, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"points must be [N, D], got shape {p.shape}")
    ok = np.isfinite(p).all(axis=1)
    no_worse = (p[None, :, :] <= p[:, None, :]).all(axis=-1)  # [i, j]: j no worse than i
    better = (p[None, :, :] < p[:, None, :]).any(axis=-1)      # [i, j]: j better somewhere
    dominated = (no_worse & better & ok[None, :]).any(axis=1)
    return ok & ~dominated


def _fronts(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(on the overall L0–FVU front, on its own group's front), bool [N] each."""
    pts = np.array([[metric(r, "l0"), metric(r, "fvu")] for r in rows])
    overall = pareto(pts)
    in_group = np.zeros(len(rows), bool)
    groups = np.array([r["group"] for r in rows])
    for g in dict.fromkeys(groups):
        sel = groups == g
        in_group[sel] = pareto(pts[sel])
    return overall, in_group


# -- tables --------------------------------------------------------------------------------------

def _columns(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(hyperparameter keys, metric keys) present in any row; the size keys are left to the
    n_features column."""
    hkeys = sorted({k for r in rows for k in r["hparams"] if not is_size_key(k)})
    present = {k for r in rows for k in r["metrics"]}
    mkeys = [m for m in METRICS if m in present] + sorted(present - set(METRICS))
    return hkeys, mkeys


def _csv_value(v) -> str:
    """Lossless text: floats by repr (they parse back to the same float), None as ""."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | tuple):
        return json.dumps(list(v))
    return str(v)


def _csv(rows, hkeys, mkeys, overall, in_group) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["member", "group", *hkeys, "n_features", "tokens", *mkeys, "pareto",
                "pareto_in_group"])
    for r, p, pg in zip(rows, overall, in_group, strict=True):
        w.writerow([r["member"], r["group"], *(_csv_value(r["hparams"].get(k)) for k in hkeys),
                    _csv_value(r["n_features"]), _csv_value(r["tokens"]),
                    *(_csv_value(r["metrics"].get(k)) for k in mkeys),
                    _csv_value(bool(p)), _csv_value(bool(pg))])
    return buf.getvalue()


def _short_names(keys: Sequence[str]) -> list[str]:
    """The shortest dotted suffix of each key that no other key ends with."""
    out = []
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            s = ".".join(parts[-n:])
            if not any(o != k and (o == s or o.endswith("." + s)) for o in keys):
                break
        out.append(s)
    return out


def _md_number(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return fmt_value(v).replace("|", "\\|")


def _markdown(rows, hkeys, mkeys, overall, in_group) -> str:
    several = len({r["group"] for r in rows}) > 1
    head = ["member", *(["group"] if several else []), *_short_names(hkeys), "n_features",
            "tokens", *mkeys, "Pareto"]
    lines = ["# Sweep report", "",
             f"{len(rows)} members; Pareto = on the L0–FVU frontier (lower L0 and lower FVU "
             "better): **all** across the whole sweep"
             + (", *group* only within its own group." if several else "."), "",
             "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r, p, pg in zip(rows, overall, in_group, strict=True):
        mark = "**all**" if p else ("*group*" if several and pg else "")
        name = f"**{r['member']}**" if p else r["member"]
        cells = [name, *([r["group"] or "–"] if several else []),
                 *(_md_number(r["hparams"].get(k)) for k in hkeys),
                 _md_number(r["n_features"]), _md_number(r["tokens"]),
                 *(_md_number(r["metrics"].get(k)) for k in mkeys), mark]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- figures -------------------------------------------------------------------------------------

def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> str:
    """Write `fig` as PNG to `path` atomically; the path as a string."""
    fig.tight_layout()
    with open_atomic(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return str(path)


def _styles(rows: list[dict]) -> tuple[dict, dict]:
    """Colour per group, marker per family (`sae.arch` where the sweep varies it)."""
    colours = [f"C{i}" for i in range(10)]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    families = list(dict.fromkeys(str(r["hparams"].get("sae.arch", "")) for r in rows))
    return ({g: colours[i % len(colours)] for i, g in enumerate(groups)},
            {f: markers[i % len(markers)] for i, f in enumerate(families)})


def _frontier(rows: list[dict], y_name: str, higher_better: bool, path: Path) -> str | None:
    """L0 (log x) against one metric, every member a point, the Pareto front drawn and its
    members ringed. Returns None when written, else why it was skipped."""
    x = np.array([metric(r, "l0") for r in rows])
    y = np.array([metric(r, y_name) for r in rows])
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    if ok.sum() < 2:
        return f"fewer than 2 members with a finite positive L0 and {y_name}"
    if np.ptp(x[ok]) == 0:
        return "L0 does not vary across the sweep"
    front = pareto(np.c_[x, -y if higher_better else y]) & ok
    colour, marker = _styles(rows)
    fig = new_figure(7, 5)
    ax = fig.subplots()
    for g in colour:
        for fam in marker:
            sel = ok & np.array([r["group"] == g and str(r["hparams"].get("sae.arch", "")) == fam
                                 for r in rows])
            if sel.any():
                label = ", ".join(s for s in (g, fam) if s) or "members"
                ax.scatter(x[sel], y[sel], c=colour[g], marker=marker[fam], s=30, label=label)
    order = np.argsort(x[front])
    ax.plot(x[front][order], y[front][order], "k-", lw=1, label="Pareto front")
    if len(colour) > 1:  # each group's own front, thin, in its colour
        groups = np.array([r["group"] for r in rows])
        for i, (g, c) in enumerate(colour.items()):
            sel = np.flatnonzero(ok & (groups == g))
            own = sel[pareto(np.c_[x[sel], -y[sel] if higher_better else y[sel]])]
            own = own[np.argsort(x[own])]
            ax.plot(x[own], y[own], "--", c=c, lw=0.8, label=None if i else "each group's front")
    ax.scatter(x[front], y[front], s=110, facecolors="none", edgecolors="k", lw=1.2)
    if front.sum() <= ANNOTATE_AT_MOST:
        for i in np.flatnonzero(front):
            ax.annotate(rows[i]["member"], (x[i], y[i]), fontsize=6, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.margins(x=0.12)  # room for the labels of the end points
    ax.set_xlabel("L0 (features firing per token)")
    ax.set_ylabel(y_name + (" (higher is better)" if higher_better else " (lower is better)"))
    ax.set_title(f"L0–{y_name} frontier: {int(front.sum())} of {int(ok.sum())} members on it")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return None


def _size(rows: list[dict], path: Path) -> str | None:
    """FVU and MSE against n_features, log-log: one line per setting of the other (non-seed)
    hyperparameters through the seed means; each member a faint dot."""
    sizes = sorted({r["n_features"] for r in rows})
    if len(sizes) < 2:
        return f"one dictionary size ({sizes[0]})"
    settings: dict[tuple, list[dict]] = {}
    varying = varying_keys(rows)
    for r in rows:
        key = setting_key(r["hparams"],
                          lambda k: k not in varying or is_seed_key(k) or is_size_key(k))
        settings.setdefault(key, []).append(r)
    fig = new_figure(11, 4.5)
    axes = fig.subplots(1, 2)
    for ax, name in zip(axes, ("fvu", "mse"), strict=True):
        for i, (key, members) in enumerate(settings.items()):
            c = f"C{i % 10}"
            n = np.array([r["n_features"] for r in members], float)
            v = np.array([metric(r, name) for r in members])
            ok = np.isfinite(v) & (v > 0)
            ax.scatter(n[ok], v[ok], c=c, s=12, alpha=0.35)
            xs = np.unique(n[ok])
            means = [v[ok][n[ok] == s].mean() for s in xs]
            ax.plot(xs, means, "-o", c=c, ms=4, label=setting_label(key))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n_features (dictionary size)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("FVU against dictionary size (lines: seed means)")
    axes[1].set_title("MSE against dictionary size")
    axes[1].legend(fontsize=6, loc="best")
    save_figure(fig, path)
    return None


def _density(rows: list[dict], path: Path) -> str | None:
    """Every member's log10 feature-density histogram on one page (small multiples, shared x):
    alive features in bins of density_plot.BIN_WIDTH, dead ones (-inf) as a red bar at left."""
    from saejax.eval.density_plot import BIN_WIDTH, LOWEST  # noqa: PLC0415

    have = [r for r in rows if r.get("log10_density") is not None and len(r["log10_density"])]
    if not have:
        return "no member has log10_density"
    dens = [np.asarray(r["log10_density"], float) for r in have]
    finite = np.concatenate([d[np.isfinite(d)] for d in dens] or [np.zeros(0)])
    lo = min(LOWEST, math.floor(finite.min())) if len(finite) else LOWEST
    bins = np.arange(lo, BIN_WIDTH / 2, BIN_WIDTH)
    dead_x = lo - 1.0
    cols = min(6, math.ceil(math.sqrt(len(have))))
    nrows = math.ceil(len(have) / cols)
    fig = new_figure(3.0 * cols, 2.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, cols, sharex=True, squeeze=False)).ravel()
    for ax, r, d in zip(axes, have, dens, strict=False):
        alive = d[np.isfinite(d)]
        n_dead = int(np.sum(np.isneginf(d)))
        ax.hist(alive, bins=bins, color="tab:blue")
        ax.bar([dead_x], [n_dead], width=2 * BIN_WIDTH, color="tab:red")
        ax.axvline(-6, color="gray", ls="--", lw=0.8)   # ultralow (1e-6)
        ax.axvline(-2, color="gray", ls=":", lw=0.8)    # dense (1%)
        ax.set_title(f"{r['member']}\n{len(d)} features, {n_dead} dead", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[len(have):]:
        ax.axis("off")
    ticks = list(range(int(lo), 1, 2))
    axes[0].set_xticks([dead_x, *ticks], ["dead", *map(str, ticks)])
    axes[0].set_xlim(dead_x - 0.5, 0.2)
    fig.suptitle("log10 feature density per member (dashed: ultralow 1e-6; dotted: dense 1%)",
                 fontsize=9)
    save_figure(fig, path)
    return None


# -- the report ----------------------------------------------------------------------------------

def write_report(rows: Iterable[Mapping], out_dir: str | Path) -> dict:
    """Write out_dir/report.csv, report.md and the figures (frontier.png; with loss_recovered
    frontier_loss_recovered.png; with several sizes size.png; with densities density.png).

    Returns {"csv", "markdown": paths, "figures": {name: path}, "skipped": {name: why},
    "pareto": [members on the overall L0–FVU front], "members": [names in table order]}.
    """
    rows = sort_rows(check_rows(list(rows)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hkeys, mkeys = _columns(rows)
    overall, in_group = _fronts(rows)
    csv_path, md_path = out / "report.csv", out / "report.md"
    write_text_atomic(csv_path, _csv(rows, hkeys, mkeys, overall, in_group))
    write_text_atomic(md_path, _markdown(rows, hkeys, mkeys, overall, in_group))

    figures, skipped = {}, {}
    has_lr = any(math.isfinite(metric(r, "loss_recovered")) for r in rows)
    plans = {
        "frontier": lambda p: _frontier(rows, "fvu", False, p),
        "frontier_loss_recovered": (lambda p: _frontier(rows, "loss_recovered", True, p))
        if has_lr else None,
        "size": lambda p: _size(rows, p),
        "density": lambda p: _density(rows, p),
    }
    for name, draw in plans.items():
        path = out / f"{name}.png"
        why = draw(path) if draw else "no member has loss_recovered (report with an LM)"
        if why is None:
            figures[name] = str(path)
        else:
            skipped[name] = why
    return {"csv": str(csv_path), "markdown": str(md_path), "figures": figures,
            "skipped": skipped, "members": [r["member"] for r in rows],
            "pareto": [r["member"] for r, p in zip(rows, overall, strict=True) if p]}
