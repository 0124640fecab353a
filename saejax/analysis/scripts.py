"""Script features: which SAE features (and, as the baseline, which neurons) pick out one writing
system, e.g. the paper's Arabic feature A/1/3450 (Arabic is 0.13% of tokens but 81% of the
tokens where the feature fires, 98% of those where its activation exceeds 5).

Token classes (which tokens are in which writing system, resolving byte tokens that split a
character in context) come from `saejax.text.labels`; `ScriptStats` reports the share of
*fragment* tokens (not decodable alone), how many of them context resolved into a class (what
per-token decoding would have missed), and the share of *unresolved* tokens (in no class).

Counters. For every unit (SAE feature or MLP neuron) and class, one streamed pass keeps on device:
firing tokens above each activation level, those in the class, activation mass (sum of positive
activations) in the class and overall, and the max activation. From them: precision = share of
the unit's firing tokens that are in the class, recall = share of the class's tokens on which the
unit fires, and precision per activation level (levels absolute, or fractions of each unit's max
with an extra max pass). Memory is O(classes x levels x units) plus one [chunk, units] working
set (`chunk_elements`), so 100k+ features fit.

    labeler = ScriptLabeler.from_tokenizer(load_tokenizer(lm_dir), ("arabic", "cyrillic"))
    stats = script_stats(lm, tokens, range(len(tokens)), labeler, sae=sae)
    print(format_report(stats))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saejax.analysis.topk_stream import chunk_tokens, scan_chunks
from saejax.atomic import json_safe, write_json_atomic
from saejax.lm.stream import site_batches
from saejax.text.labels import ScriptLabeler, check_classes

# -- streamed per-unit counters -----------------------------------------------------------------


@dataclass(frozen=True)
class ScriptOptions:
    """What a script-feature analysis counts and reports."""

    classes: tuple[str, ...] = ("arabic",)
    """Token classes (keys of `saejax.text.labels.SCRIPT_RANGES`) to measure, all in one pass."""
    levels: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0)
    """Activation levels for precision per level, ascending; the first must be 0 (it defines
    "fires": activation > 0). The paper quotes > 5 for its Arabic feature."""
    relative_levels: bool = False
    """Levels are fractions of each unit's max activation over the same contexts (e.g.
    0, 0.25, 0.5, 0.75), found by an extra pass, instead of absolute activations."""
    neurons: bool = True
    """Also count the raw site activations (MLP neurons) as units: the paper's baseline."""
    min_support: int = 10
    """Rankings by precision only consider units firing on at least this many tokens."""
    top_k: int = 10
    """Units listed per ranking in the report."""
    batch_contexts: int = 32
    """Contexts per LM forward call."""
    chunk_elements: int = 1 << 25
    """Tokens x units encoded at once (chunk = chunk_elements // units tokens), bounding the
    [chunk, units] working set (2^25 float32 = 128 MB per array)."""

    def __post_init__(self):
        check_classes(self.classes)
        lv = list(self.levels)
        if not lv or lv[0] != 0 or any(b <= a for a, b in zip(lv, lv[1:])):
            raise ValueError(f"levels must be strictly ascending and start at 0, got {lv}")
        for name, low in (("min_support", 0), ("top_k", 1), ("batch_contexts", 1),
                          ("chunk_elements", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


@dataclass
class UnitCounts:
    """Per-unit counters of one kind of unit (read back to host, numpy)."""

    thresholds: np.ndarray
    """[L, U] activation threshold of each level (absolute; relative levels times max)."""
    n_fires: np.ndarray
    """[L, U] counted tokens with activation > threshold."""
    n_in: np.ndarray
    """[C, L, U] of those, tokens in each class."""
    mass: np.ndarray
    """[U] sum of positive activations."""
    mass_in: np.ndarray
    """[C, U] of it, on tokens in each class."""
    max_act: np.ndarray
    """[U] largest activation (0 if the unit never fires)."""


class _State(NamedTuple):
    n_fires: jax.Array
    n_in: jax.Array
    mass: jax.Array
    mass_in: jax.Array
    max_act: jax.Array


def _init_state(n_classes: int, n_levels: int, n_units: int) -> _State:
    z = jnp.zeros
    return _State(z((n_levels, n_units), jnp.int32), z((n_classes, n_levels, n_units), jnp.int32),
                  z(n_units, jnp.float32), z((n_classes, n_units), jnp.float32),
                  z(n_units, jnp.float32))


def _count_chunk(st: _State, f: jax.Array, valid: jax.Array, in_class: jax.Array,
                 thresholds: jax.Array) -> _State:
    """Fold a chunk into the counters. f [n, U]; valid [n] bool; in_class [n, C] bool;
    thresholds [L, U]."""
    hi = jax.lax.Precision.HIGHEST  # 0/1 and activation sums must not go through bf16
    inc = (in_class & valid[:, None]).astype(jnp.float32)
    fired = [(f > t) & valid[:, None] for t in thresholds]
    n_fires = jnp.stack([x.sum(0, dtype=jnp.int32) for x in fired])
    # [C, L, U]; per chunk the sums are < 2^24, so float32 counts are exact.
    n_in = jnp.stack([jnp.einsum("nc,nu->cu", inc, x.astype(jnp.float32), precision=hi)
                      for x in fired], axis=1)
    pos = jnp.where(valid[:, None] & (f > 0), f, 0.0)
    return _State(st.n_fires + n_fires, st.n_in + jnp.round(n_in).astype(jnp.int32),
                  st.mass + pos.sum(0), st.mass_in + jnp.einsum("nc,nu->cu", inc, pos,
                                                                precision=hi),
                  jnp.maximum(st.max_act, pos.max(0)))


def _batch_step(encode: Callable, chunk_elements: int) -> Callable:
    """Jitted (params, state, x [B, T, d], mask [B, T], in_class [B, T, C], thresholds [L, U])
    -> state, tokens encoded a chunk at a time."""

    @jax.jit
    def step(params, state, x, mask, in_class, thresholds):
        B, T, d = x.shape
        U = state.max_act.shape[0]

        def body(st, chunk):
            _, xc, mc, ic = chunk
            f = encode(params, xc).astype(jnp.float32)
            return _count_chunk(st, f, mc, ic, thresholds)

        return scan_chunks(body, state, (x.reshape(B * T, d), mask.reshape(-1),
                                         in_class.reshape(B * T, -1)),
                           chunk_tokens(B * T, U, chunk_elements))

    return step


def _neurons(params, x):
    """The site's raw activations as units (the neuron baseline)."""
    return x


@dataclass
class ScriptStats:
    """Everything one pass measured (host numpy)."""

    classes: tuple[str, ...]
    levels: tuple[float, ...]
    """The options' levels (fractions of max when relative_levels)."""
    relative_levels: bool
    n_contexts: int
    n_tokens: int
    """Counted positions (BOS excluded)."""
    n_class: np.ndarray
    """[C] counted tokens in each class."""
    n_fragment: int
    """Counted tokens that are not complete UTF-8 alone."""
    n_fragment_in: np.ndarray
    """[C] fragment tokens that context put in each class (missed by per-token decoding)."""
    n_unresolved: int
    """Counted tokens with bytes no complete character accounts for
    (`saejax.text.labels.TokenLabels.unresolved`)."""
    units: dict[str, UnitCounts] = field(default_factory=dict)
    """"feature" (SAE features) and/or "neuron" (site activations)."""
    name: str = ""
    """The SAE's name, for reports."""
    site: str = ""

    def _c(self, cls: str) -> int:
        if cls not in self.classes:
            raise KeyError(f"class {cls!r} was not measured; measured: {list(self.classes)}")
        return self.classes.index(cls)

    def share(self, cls: str) -> float:
        """Fraction of counted tokens in the class."""
        return float(self.n_class[self._c(cls)] / max(self.n_tokens, 1))

    def precision(self, kind: str, cls: str) -> np.ndarray:
        """[L, U] share of each unit's tokens above each level that are in the class (NaN when
        none are above it)."""
        u = self.units[kind]
        with np.errstate(invalid="ignore", divide="ignore"):
            return u.n_in[self._c(cls)] / u.n_fires

    def recall(self, kind: str, cls: str) -> np.ndarray:
        """[U] share of the class's tokens on which each unit fires (NaN if the class is empty)."""
        n = self.n_class[self._c(cls)]
        return self.units[kind].n_in[self._c(cls), 0] / n if n else np.full(
            self.units[kind].n_in.shape[-1], np.nan)

    def f1(self, kind: str, cls: str) -> np.ndarray:
        """[U] harmonic mean of precision (at level 0) and recall (0 where undefined)."""
        p, r = self.precision(kind, cls)[0], self.recall(kind, cls)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(2 * p * r / (p + r))

    def rank(self, kind: str, cls: str, by: str = "precision", min_support: int = 10,
             top_k: int = 10) -> list[dict]:
        """The top_k units by `precision` (units firing >= min_support times; ties by support)
        or by `f1`, as report rows (`unit_row`)."""
        u = self.units[kind]
        if by == "precision":
            p = np.nan_to_num(self.precision(kind, cls)[0], nan=-1.0)
            p = np.where(u.n_fires[0] >= max(min_support, 1), p, -1.0)
            order = np.lexsort((-u.n_fires[0], -p))
            order = order[p[order] >= 0]
        elif by == "f1":
            f1 = self.f1(kind, cls)
            order = np.lexsort((-u.n_fires[0], -f1))
            order = order[f1[order] > 0]
        else:
            raise ValueError(f"by must be 'precision' or 'f1', got {by!r}")
        return [self.unit_row(kind, cls, int(i)) for i in order[:top_k]]

    def unit_row(self, kind: str, cls: str, unit: int) -> dict:
        """One unit's numbers for a class: precision, recall, F1, counts, mass share and the
        precision above each level."""
        u, c = self.units[kind], self._c(cls)
        prec = self.precision(kind, cls)[:, unit]
        return json_safe({  # undefined ratios (NaN) as None
            "id": unit, "precision": prec[0], "recall": self.recall(kind, cls)[unit],
            "f1": self.f1(kind, cls)[unit], "n_fires": int(u.n_fires[0, unit]),
            "n_in": int(u.n_in[c, 0, unit]),
            "mass_in_share": u.mass_in[c, unit] / u.mass[unit] if u.mass[unit] else None,
            "max_act": float(u.max_act[unit]),
            "levels": [{"level": lv, "threshold": float(u.thresholds[i, unit]),
                        "n_fires": int(u.n_fires[i, unit]), "precision": prec[i]}
                       for i, lv in enumerate(self.levels)],
        })

    def to_dict(self, top_k: int = 10, min_support: int = 10) -> dict:
        """JSON-able summary: dataset shares, fragment counts and the rankings per class."""
        return {
            "sae": self.name, "site": self.site, "n_contexts": self.n_contexts,
            "n_tokens": self.n_tokens, "levels": list(self.levels),
            "relative_levels": self.relative_levels,
            "fragment_tokens": self.n_fragment, "unresolved_tokens": self.n_unresolved,
            "classes": {cls: {
                "n_tokens": int(self.n_class[c]), "share": self.share(cls),
                "fragments_resolved": int(self.n_fragment_in[c]),
                **{kind: {by: self.rank(kind, cls, by, min_support, top_k)
                          for by in ("precision", "f1")} for kind in self.units}}
                for c, cls in enumerate(self.classes)},
        }


def _labelled_batches(lm, tokens, contexts, labeler: ScriptLabeler, site: str,
                      batch_contexts: int):
    """(SiteBatch, TokenLabels) over the contexts, the one pass both analyses use."""
    if len(contexts) == 0:
        raise ValueError("no contexts to analyse (contexts selects an empty range)")
    if tokens.vocab_size > labeler.vocab_size:
        raise ValueError(f"token dataset {tokens.path} has vocab_size {tokens.vocab_size} but "
                         f"the tokenizer labels only {labeler.vocab_size} ids")
    for batch in site_batches(lm, tokens, [site], contexts, batch_contexts=batch_contexts):
        yield batch, labeler.label(batch.tokens)


def _units(sae, neurons: bool, site: str) -> dict[str, tuple[Callable, dict]]:
    units = {}
    if sae is not None:
        if site != sae.site and sae.site:
            raise ValueError(f"SAE {sae.name!r} reads {sae.site}, not site {site!r}")
        units["feature"] = (sae.encode, sae.params)
    if neurons:
        units["neuron"] = (_neurons, {})
    if not units:
        raise ValueError("nothing to measure: pass an SAE or set neurons=True")
    return units


def _site_of(sae, site: str) -> str:
    site = site or (sae.site if sae is not None else "")
    if not site:
        raise ValueError("no hook site: the SAE does not record one; pass site=")
    return site


def script_stats(lm, tokens, contexts: Sequence[int], labeler: ScriptLabeler, *, sae=None,
                 site: str = "", opts: ScriptOptions = ScriptOptions()) -> ScriptStats:
    """Per-unit class counters of the SAE's features (and/or the site's neurons) over `contexts`
    of the TokenDataset `tokens`, run through `lm` (classes: the labeler's; levels and the
    rest: opts)."""
    site = _site_of(sae, site)
    units = _units(sae, opts.neurons, site)
    if len(contexts) * tokens.ctx_len >= 2**31:
        raise ValueError(f"{len(contexts)} contexts of {tokens.ctx_len} tokens could overflow "
                         "the int32 counters; analyse fewer contexts at a time")
    levels = np.asarray(opts.levels, np.float32)
    maxes = None
    if opts.relative_levels:  # a first pass for each unit's max activation
        first = _count_pass(lm, tokens, contexts, labeler, site, units, None, opts)[0]
        maxes = {k: u.max_act for k, u in first.items()}
    counts, totals = _count_pass(lm, tokens, contexts, labeler, site, units,
                                 (levels, maxes), opts)
    return ScriptStats(labeler.classes, tuple(opts.levels), opts.relative_levels, len(contexts),
                       units=counts, name=sae.name if sae is not None else "", site=site,
                       **totals)


def _count_pass(lm, tokens, contexts, labeler, site, units, levels, opts):
    """One pass: ({kind: UnitCounts}, dataset totals). levels: None (max only) or (levels [L],
    {kind: max [U]} for relative levels, else None)."""
    C = len(labeler.classes)
    steps = {k: _batch_step(enc, opts.chunk_elements) for k, (enc, _) in units.items()}
    states, thresholds = {}, {}
    n_tok = n_frag = n_unres = 0
    n_class, n_frag_in = np.zeros(C, np.int64), np.zeros(C, np.int64)
    for batch, lab in _labelled_batches(lm, tokens, contexts, labeler, site,
                                        opts.batch_contexts):
        x, m = batch.acts[site], batch.mask
        in_class = np.moveaxis(lab.matrix(), 0, -1)  # [B, T, C]
        for kind, (enc, params) in units.items():
            if kind not in states:
                U = jax.eval_shape(enc, params, x[:1, :1]).shape[-1]
                thresholds[kind] = _thresholds(levels, kind, U)
                states[kind] = _init_state(C, len(thresholds[kind]), U)
            states[kind] = steps[kind](params, states[kind], x, m, in_class, thresholds[kind])
        n_tok += int(m.sum())
        n_frag += int((lab.fragment & m).sum())
        n_unres += int((lab.unresolved & m).sum())
        n_class += (in_class & m[..., None]).sum((0, 1))
        n_frag_in += (in_class & (lab.fragment & m)[..., None]).sum((0, 1))
    counts = {k: UnitCounts(np.asarray(thresholds[k]), *map(np.asarray, jax.device_get(s)))
              for k, s in states.items()}
    return counts, dict(n_tokens=n_tok, n_class=n_class, n_fragment=n_frag,
                        n_fragment_in=n_frag_in, n_unresolved=n_unres)


def _thresholds(levels, kind: str, n_units: int) -> jax.Array:
    """[L, U] thresholds: absolute levels broadcast, or fractions of each unit's max."""
    if levels is None:
        return jnp.zeros((1, n_units), jnp.float32)
    lv, maxes = levels
    if maxes is None:
        return jnp.broadcast_to(jnp.asarray(lv)[:, None], (len(lv), n_units))
    return jnp.asarray(lv[:, None] * maxes[kind][None, :], jnp.float32)


# -- one unit in detail -------------------------------------------------------------------------


def unit_activations(lm, tokens, contexts: Sequence[int], labeler: ScriptLabeler,
                     units: Sequence[int], *, kind: str = "feature", sae=None, site: str = "",
                     batch_contexts: int = 32) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{unit: (acts [n] float32, in_class [C, n] bool)} over the counted tokens where the unit
    fires (activation > 0): host memory is O(firings of the chosen units)."""
    site = _site_of(sae, site)
    enc, params = _units(sae, kind == "neuron", site)[kind]
    ids = jnp.asarray(np.asarray(units, np.int32))
    pick = jax.jit(lambda p, x: enc(p, x)[..., ids])
    got: dict[int, list] = {int(u): [] for u in units}
    for batch, lab in _labelled_batches(lm, tokens, contexts, labeler, site, batch_contexts):
        f = np.asarray(pick(params, batch.acts[site]))  # [B, T, k]
        cls = lab.matrix()
        for j, u in enumerate(got):
            hit = batch.mask & (f[..., j] > 0)
            got[u].append((f[..., j][hit], cls[:, hit]))
    return {u: (np.concatenate([a for a, _ in v]).astype(np.float32),
                np.concatenate([c for _, c in v], axis=1)) for u, v in got.items()}


def plot_class_histogram(acts: np.ndarray, in_class: np.ndarray, path, *, class_name: str,
                         title: str = "", bins: int = 40) -> None:
    """The paper's plot: a stacked histogram of a unit's activations (firings only), the part
    in the class and the rest in two colours, written as a PNG to `path`."""
    import matplotlib  # noqa: PLC0415 (only for this figure)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    acts, in_class = np.asarray(acts), np.asarray(in_class, bool)
    edges = np.linspace(0.0, float(acts.max()) if acts.size else 1.0, bins + 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist([acts[in_class], acts[~in_class]], bins=edges, stacked=True,
            label=[class_name, f"not {class_name}"], color=["tab:orange", "tab:gray"])
    ax.set_xlabel("activation")
    ax.set_ylabel("tokens")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- report -------------------------------------------------------------------------------------


def format_report(stats: ScriptStats, top_k: int = 10, min_support: int = 10) -> str:
    """A short plain-text summary: per class, its share and the best units of each kind."""
    pct = lambda x: "  -  " if x is None else f"{100 * x:5.1f}"  # noqa: E731
    lines = [f"script features of {stats.name or '(neurons only)'} at {stats.site}: "
             f"{stats.n_tokens:,} tokens in {stats.n_contexts:,} contexts; fragment tokens "
             f"{stats.n_fragment:,} ({100 * stats.n_fragment / max(stats.n_tokens, 1):.2f}%), "
             f"unresolved {stats.n_unresolved:,}"]
    lv = "".join(f" >{v:g}{'x' if stats.relative_levels else ''}".rjust(7)
                 for v in stats.levels[1:])
    for c, cls in enumerate(stats.classes):
        if not stats.n_class[c]:  # say so plainly rather than print tables of zeros
            lines.append(f"\n{cls}: no {cls} token occurs in the {stats.n_contexts:,} contexts "
                         f"analysed, so no unit can be ranked for it (analyse contexts that "
                         f"hold {cls} text)")
            continue
        lines.append(f"\n{cls}: {int(stats.n_class[c]):,} tokens ({100 * stats.share(cls):.3f}% of "
                     f"counted), {int(stats.n_fragment_in[c]):,} of them fragments resolved in "
                     "context")
        for kind in stats.units:
            for by in ("precision", "f1"):
                rows = stats.rank(kind, cls, by, min_support, top_k)
                lines.append(f"  {kind}s by {by}"
                             f"{f' (>= {min_support} firings)' if by == 'precision' else ''}:")
                lines.append(f"    {'id':>7} {'prec%':>5} {'rec%':>5} {'F1':>5} {'fires':>8}"
                             f"{lv}")
                for r in rows:
                    lines.append(
                        f"    {r['id']:>7} {pct(r['precision'])} {pct(r['recall'])} "
                        f"{r['f1']:5.2f} {r['n_fires']:>8,}"
                        + "".join(f" {pct(x['precision'])}".rjust(7) for x in r["levels"][1:]))
                if not rows:
                    lines.append("    (none)")
    return "\n".join(lines) + "\n"


# -- from paths ---------------------------------------------------------------------------------


def analyse_scripts(sae_path, tokens_path, out_dir=None, *, contexts: str = "",
                    lm_path: str = "", tokenizer_path: str = "",
                    opts: ScriptOptions = ScriptOptions()) -> ScriptStats:
    """Load the SAE (run directory or SAELens folder), its LM (lm_path or the SAE's record), the
    tokenizer (tokenizer_path or the LM's directory) and the token dataset; measure
    `contexts` ("START:STOP", "" = all). With out_dir, write scripts.json (`to_dict`),
    scripts.txt (`format_report`) and, per class, a histogram PNG of the best feature by
    F1 (`plot_class_histogram`)."""
    from saejax.eval.trained import load_sae  # noqa: PLC0415
    from saejax.lm import load_lm  # noqa: PLC0415
    from saejax.lm.stream import parse_contexts  # noqa: PLC0415
    from saejax.text.tokenizer import load_tokenizer  # noqa: PLC0415
    from saejax.text.tokens import TokenDataset  # noqa: PLC0415

    sae = load_sae(sae_path)
    lm_path = lm_path or sae.lm_path
    if not lm_path:
        raise ValueError(f"SAE {sae_path} does not record its LM; pass lm_path")
    lm, tokens = load_lm(lm_path), TokenDataset(tokens_path)
    labeler = ScriptLabeler.from_tokenizer(load_tokenizer(tokenizer_path or lm_path),
                                           opts.classes)
    ctx = parse_contexts(contexts, len(tokens))
    stats = script_stats(lm, tokens, ctx, labeler, sae=sae, opts=opts)
    if out_dir is None:
        return stats
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(out / "scripts.json"), stats.to_dict(opts.top_k, opts.min_support))
    (out / "scripts.txt").write_text(format_report(stats, opts.top_k, opts.min_support))
    # The figure shows the best feature by F1: by precision alone a rare, weak feature that
    # fires on a handful of class tokens would win.
    best = {cls: rows[0]["id"] for cls in stats.classes
            if (rows := stats.rank("feature", cls, "f1", opts.min_support, 1))}
    if best:  # one more pass, for the chosen features only
        acts = unit_activations(lm, tokens, ctx, labeler, sorted(set(best.values())), sae=sae,
                                batch_contexts=opts.batch_contexts)
        for cls, unit in best.items():
            a, c = acts[unit]
            plot_class_histogram(a, c[stats.classes.index(cls)], out / f"scripts_{cls}_{unit}.png",
                                 class_name=cls, title=f"{sae.name} feature {unit}")
    return stats
