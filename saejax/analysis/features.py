"""`analyze`: every feature of a trained SAE over a token dataset, written as the analysis
directory the feature browser reads (`load_analysis`, `feature`).

    out_dir/analysis.json       {"format": "saejax.analysis", "version": 1,
                                 "sae": {name, source, site, lm_path, n_features, arch, k},
                                 "tokens": {path, contexts "START:STOP", n_contexts,
                                            n_tokens (counted positions)},
                                 "top_k", "n_samples", "context_window", "n_logits", "seed",
                                 "hist_edges": [bins + 1 log10 edges],
                                 "features": [{id, n_fired, density, max_act, mean_act}, ...]}
    out_dir/features/{id}.json  {id, n_fired, density, max_act, mean_act,
                                 "top": [example, ...]      largest activation first,
                                 "samples": [example, ...]  uniform sample of firing examples,
                                                            sorted by activation, descending,
                                 "hist": {"counts": [underflow, bins..., overflow]},
                                 "logits": {"promoted": [[token, value], ...],
                                            "suppressed": [[token, value], ...]},
                                 "explanation": null, "score": null}
    example = {"context", "pos", "act", "tokens": [str], "acts": [float], "focus": int}

An example's `tokens` are the decoded strings of a window of tokens around the position (cut at
the context's edges; `saejax.text.labels.TokenStrings`), `acts` the feature's activation on each
of them (0 at BOS/separator positions, which are not counted), `focus` the example's index in the
window.
Density is over counted positions; mean_act is the mean over the tokens where the feature fires.
Dead features have a file too (n_fired 0, empty example lists, logit effects still given).

Two passes over the contexts: `topk_stream.stream_features` (statistics and which examples),
then the contexts holding the chosen examples again, to read each example's window of
activations for its feature (`example_windows`), feature group by feature group so host memory
stays bounded. The directory is written under a temporary name and renamed into place
(`saejax.atomic.atomic_dir`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saejax.analysis.layout import FEATURES, FORMAT, INDEX, VERSION, feature, load_analysis
from saejax.analysis.logit_effects import LogitEffects, logit_effects
from saejax.analysis.topk_stream import (Example, FeatureSummary, StreamOptions, chunk_tokens,
                                         pad_batch, scan_chunks, stream_features)
from saejax.atomic import atomic_dir
from saejax.lm.stream import parse_contexts, site_batches
from saejax.text.labels import TokenStrings


@dataclass(frozen=True)
class AnalysisOptions:
    """What `analyze` computes and over which text."""

    contexts: str = "0:2000"
    """Contexts of the token dataset to read, START:STOP (python-slice style, '' = all)."""
    top_k: int = 20
    """Top-activating examples per feature."""
    n_samples: int = 20
    """Uniformly sampled firing examples per feature (examples across the activation range)."""
    context_window: tuple[int, int] = (10, 4)
    """(tokens before, tokens after) the example's position shown with it (cut at the
    context's edges)."""
    batch_contexts: int = 32
    """Contexts per LM forward."""
    n_logits: int = 10
    """Promoted and suppressed tokens listed per feature."""
    lm_path: str | None = None
    """The LM (HF directory); None = the one the SAE records. Its directory also gives the
    tokenizer."""
    seed: int = 0
    """Seed of the uniform samples (same seed, same samples, for any batch_contexts)."""
    chunk_elements: int = 1 << 25
    """Bound on tokens x features (and features x vocab) encoded at once on device."""
    window_elements: int = 1 << 24
    """Bound on example-window activations held on host at once: features are windowed in
    groups of window_elements // ((top_k + n_samples) * window length)."""

    def __post_init__(self):
        a, b = self.context_window
        if a < 0 or b < 0:
            raise ValueError(f"context_window must be two counts >= 0, got {self.context_window}")
        for name in ("batch_contexts", "n_logits", "window_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.stream()  # checks top_k, n_samples, chunk_elements

    def stream(self) -> StreamOptions:
        return StreamOptions(top_k=self.top_k, n_samples=self.n_samples, seed=self.seed,
                             chunk_elements=self.chunk_elements)


# -- example windows -----------------------------------------------------------------------------


def _window_step(encode, chunk_elements: int):
    """Jitted (params, x [B, T, d], mask [B, T], q_tok [Q], q_feat [Q]) -> [Q] activations of
    feature q_feat at flat token q_tok (row * T + pos; -1 = none -> 0), encoding chunk tokens
    at a time (full encode, so TopK-style features that depend on all latents are exact)."""
    @jax.jit
    def step(params, x, mask, q_tok, q_feat):
        B, T, d = x.shape
        F = params["W_dec"].shape[0]
        C = chunk_tokens(B * T, F, chunk_elements)

        def body(vals, chunk):
            start, xc, mc = chunk
            f = jnp.where(mc[:, None], encode(params, xc), 0.0)
            local = q_tok - start
            inside = (q_tok >= 0) & (local >= 0) & (local < C)
            return jnp.where(inside, f[jnp.clip(local, 0, C - 1), q_feat], vals)

        return scan_chunks(body, jnp.zeros(q_tok.shape, jnp.float32),
                           (x.reshape(B * T, d), mask.reshape(-1)), C)

    return step


@dataclass
class Windows:
    """Windows of E examples (host numpy)."""

    start: np.ndarray
    """[E] first position of each window in its context."""
    stop: np.ndarray
    """[E] one past the last position."""
    ids: np.ndarray
    """[E, W] token ids at start + w (valid for w < stop - start)."""
    acts: np.ndarray
    """[E, W] the example's feature's activation there (0 at uncounted positions)."""


def example_windows(sae, lm, tokens, feat: np.ndarray, ctx: np.ndarray, pos: np.ndarray,
                    window: tuple[int, int], *, batch_contexts: int = 32,
                    chunk_elements: int = 1 << 25) -> Windows:
    """Activations of feature feat[e] on the tokens around (ctx[e], pos[e]), e < E.

    Re-runs only the distinct contexts involved, batch_contexts at a time. Device memory: one
    batch's activations plus [chunk, F] (chunk * F <= chunk_elements); host: [E, W]."""
    T = tokens.ctx_len
    before, after = window
    W = before + after + 1
    start = np.maximum(pos - before, 0)
    stop = np.minimum(pos + after + 1, T)
    ids = np.zeros((len(feat), W), np.int64)
    acts = np.zeros((len(feat), W), np.float32)
    uniq, inv = np.unique(ctx, return_inverse=True)
    order = np.argsort(inv, kind="stable")  # examples grouped by context
    bounds = np.searchsorted(inv[order], np.arange(len(uniq) + 1))
    step = _window_step(sae.encode, chunk_elements)
    first = 0
    for batch in site_batches(lm, tokens, [sae.site], uniq, batch_contexts=batch_contexts):
        B = len(batch.index)
        sel = order[bounds[first]:bounds[first + B]]
        row = inv[sel] - first
        t = start[sel, None] + np.arange(W)
        ok = t < stop[sel, None]
        ids[sel] = np.where(ok, batch.tokens[row[:, None], np.minimum(t, T - 1)], 0)
        q_tok = np.where(ok, row[:, None] * T + t, -1).reshape(-1)
        q_feat = np.repeat(feat[sel], W)
        # Pad queries to a power of two: few distinct shapes, few compiles.
        Q = 1 << max(0, int(len(q_tok) - 1).bit_length())
        q_tok = np.pad(q_tok, (0, Q - len(q_tok)), constant_values=-1).astype(np.int32)
        q_feat = np.pad(q_feat, (0, Q - len(q_feat))).astype(np.int32)
        x, mask, _ = pad_batch(batch, sae.site, batch_contexts)
        vals = step(sae.params, x, mask, q_tok, q_feat)
        acts[sel] = np.asarray(vals)[:len(sel) * W].reshape(len(sel), W)
        first += B
    return Windows(start, stop, ids, acts)


# -- writing -------------------------------------------------------------------------------------


def _sig(x, digits: int = 6):
    """x (scalar or array) rounded to `digits` significant digits, as Python floats whose JSON
    text is short (round(x * 10^d) / 10^d is the double nearest the decimal)."""
    a = np.asarray(x, np.float64)
    mag = np.floor(np.log10(np.where(a == 0, 1.0, np.abs(a))))
    scale = 10.0 ** np.clip(digits - 1 - mag, 0, 15)
    return (np.round(a * scale) / scale).tolist()


def _example_records(examples: list[Example], win: Windows, offset: int,
                     strings: TokenStrings) -> list[dict[str, Any]]:
    out = []
    for i, ex in enumerate(examples):
        e = offset + i
        n = int(win.stop[e] - win.start[e])
        out.append({"context": ex.context, "pos": ex.pos, "act": _sig(ex.act),
                    "tokens": strings.window(win.ids[e, :n]), "acts": _sig(win.acts[e, :n]),
                    "focus": int(ex.pos - win.start[e])})
    return out


def _feature_stats(summary: FeatureSummary, j: int) -> dict[str, Any]:
    s = summary.state
    return {"id": j, "n_fired": int(s.n_fired[j]), "density": _sig(summary.density[j]),
            "max_act": _sig(s.max_act[j]), "mean_act": _sig(summary.mean_act[j])}


def _logit_record(effects: LogitEffects, j: int, strings: TokenStrings) -> dict[str, Any]:
    pair = lambda ids, vals: [[t, v] for t, v in zip(strings(ids[j]), _sig(vals[j]))]  # noqa: E731
    return {"promoted": pair(effects.promoted_ids, effects.promoted),
            "suppressed": pair(effects.suppressed_ids, effects.suppressed)}


def write_feature_files(dest: Path, sae, lm, tokens, summary: FeatureSummary,
                        effects: LogitEffects, strings: TokenStrings,
                        opts: AnalysisOptions) -> None:
    """features/{id}.json for every feature, windowed group by group (bounded host memory)."""
    (dest / FEATURES).mkdir()
    W = sum(opts.context_window) + 1
    group = max(1, opts.window_elements // ((opts.top_k + opts.n_samples) * W))
    for lo in range(0, summary.n_features, group):
        js = range(lo, min(lo + group, summary.n_features))
        chosen = {j: (summary.top(j), summary.samples(j)) for j in js}
        flat = [(j, ex.context, ex.pos) for j in js for part in chosen[j] for ex in part]
        feat, ctx, pos = np.array(flat, np.int64).reshape(-1, 3).T
        win = example_windows(sae, lm, tokens, feat, ctx, pos, opts.context_window,
                              batch_contexts=opts.batch_contexts,
                              chunk_elements=opts.chunk_elements)
        offset = 0
        for j in js:
            top, samples = chosen[j]
            rec = _feature_stats(summary, j)
            rec["top"] = _example_records(top, win, offset, strings)
            rec["samples"] = _example_records(samples, win, offset + len(top), strings)
            offset += len(top) + len(samples)
            rec["hist"] = {"counts": summary.state.hist[j].tolist()}
            rec["logits"] = _logit_record(effects, j, strings)
            rec["explanation"] = rec["score"] = None
            with open(dest / FEATURES / f"{j}.json", "w", encoding="utf-8") as f:
                json.dump(rec, f, ensure_ascii=False)


def _check_destination(out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir.is_dir() and (out_dir / INDEX).is_file()):
        raise FileExistsError(f"{out_dir} exists and is not an analysis directory (no {INDEX}); "
                              f"refusing to replace it: choose another out_dir")


def analyze(sae_path: str | os.PathLike, tokens_path: str | os.PathLike,
            out_dir: str | os.PathLike, options: AnalysisOptions | None = None,
            **overrides: Any) -> Path:
    """Analyse every feature of the SAE at sae_path (run directory or SAELens folder) over
    contexts of the token dataset at tokens_path; write the analysis directory (module
    docstring) to out_dir and return its path.

    Options come from `options` with any AnalysisOptions field overridden by keyword, e.g.
    analyze(sae, toks, out, contexts="0:500", top_k=10, context_window=(8, 2)).
    Device memory is bounded by the options' chunk sizes (see topk_stream), not by F or the
    number of tokens; an existing analysis at out_dir is replaced, anything else is refused.
    """
    from saejax.eval.trained import load_sae  # noqa: PLC0415 (heavy imports, at call time)
    from saejax.lm.load import load_lm  # noqa: PLC0415
    from saejax.text.tokenizer import load_tokenizer  # noqa: PLC0415
    from saejax.text.tokens import TokenDataset  # noqa: PLC0415

    opts = replace(options or AnalysisOptions(), **overrides)
    out_dir = Path(out_dir)
    _check_destination(out_dir)
    sae = load_sae(sae_path)
    lm_path = opts.lm_path or sae.lm_path
    if not lm_path:
        raise ValueError(f"SAE {sae_path} does not record its LM; pass lm_path")
    tokens = TokenDataset(tokens_path)
    contexts = parse_contexts(opts.contexts, len(tokens))
    lm = load_lm(lm_path)
    strings = TokenStrings(load_tokenizer(lm_path))

    summary = stream_features(sae, lm, tokens, contexts, opts.stream(),
                              batch_contexts=opts.batch_contexts)
    effects = logit_effects(lm, sae.site, sae.params["W_dec"], opts.n_logits,
                            opts.chunk_elements)
    with atomic_dir(out_dir) as tmp:
        write_feature_files(tmp, sae, lm, tokens, summary, effects, strings, opts)
        index = {
            "format": FORMAT, "version": VERSION,
            "sae": {"name": sae.name, "source": sae.source, "site": sae.site, "lm_path": lm_path,
                    "n_features": sae.n_features, "arch": sae.arch, "k": sae.k},
            "tokens": {"path": str(tokens_path), "contexts": opts.contexts,
                       "n_contexts": len(contexts), "n_tokens": summary.n_tokens},
            "top_k": opts.top_k, "n_samples": opts.n_samples,
            "context_window": list(opts.context_window), "n_logits": opts.n_logits,
            "seed": opts.seed, "hist_edges": summary.opts.hist_edges().tolist(),
            "features": [_feature_stats(summary, j) for j in range(summary.n_features)],
        }
        with open(tmp / INDEX, "w", encoding="utf-8") as f:
            json.dump(index, f, ensure_ascii=False)
        _check_destination(out_dir)  # again: something else may have appeared there meanwhile
    return out_dir


__all__ = ["AnalysisOptions", "Windows", "analyze", "example_windows", "feature",
           "load_analysis"]
