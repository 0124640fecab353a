"""Splice evaluation: the LM's next-token loss with SAE reconstructions spliced in at their sites.

For each SAE, on held-out contexts: cross-entropy with x̂ spliced in for its site's activation,
KL(clean ‖ spliced) of the next-token distributions, and loss recovered

    (L_ablated − L_splice) / (L_ablated − L_clean)

against zero-ablation (the paper's form) and mean-ablation of the same site; plus the sparsity
and fidelity sums of `saejax.eval.sparsity`. One jitted function per batch runs the clean
forward, every SAE's spliced forward and every site's two ablations, so several SAEs (different
sites or sizes) share one pass over the data and one clean forward.

Positions. Contexts and masks follow `saejax.lm.stream.site_batches`: BOS/separator
positions do not count. Splices and ablations replace the site's activation only at counted
positions -- the SAE never trained on the others, whose activations are outliers -- and CE/KL
are taken over the predictions made at counted positions t < T − 1 (the last position has no
target). Sparsity/fidelity metrics are over the counted positions. Every metric is a sum over
positions across all batches, divided once at the end: a mean over tokens, not of batch means.

Mean ablation uses the site's mean activation over the same counted positions, from a first
pass (`site_means`) unless given.

Memory per batch: [B, T, vocab] float32 log-probabilities for the clean run and for one spliced
run at a time, and each SAE's feature activations [B·T, F] float32; choose batch_contexts for the
vocabulary, context length and dictionary size. Per-feature counts are int32 on device
(`MAX_TOKENS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saejax.eval.sparsity import batch_sums, sparsity_summary
from saejax.eval.trained import TrainedSAE
from saejax.lm.stream import site_batches

F32 = jnp.float32
MAX_TOKENS = 2**31 - 1
"""Per-feature firing counts are int32 on device: at most this many evaluated positions."""
FOLD_EVERY = 64
"""Per-batch scalar sums wait on device this many batches, then are added on host in float64."""


@dataclass(frozen=True)
class SpliceTotals:
    """What one evaluation pass accumulated (host values)."""

    n_contexts: int
    """Contexts evaluated."""
    n_tokens: int
    """Counted positions (where splices apply and sparsity is measured)."""
    n_predictions: int
    """Predictions made at counted positions with a next token (CE/KL denominators)."""
    sums: dict
    """float64 sums: {"clean_ce", "sites": {site: {"zero"|"mean": {"ce", "kl"}}},
    "saes": [{"ce", "kl", "sq_err", "total_var"}, ...]} in the order of the SAEs."""
    counts: list[dict]
    """Per SAE: {"fire_count": int64 [F], "l0_count": int64 [F + 1]}."""
    site_means: dict[str, np.ndarray]
    """{site: [d] float32} mean activation used for mean ablation and FVU."""


def unique_sites(saes: Sequence[TrainedSAE]) -> list[str]:
    """The SAEs' sites, each once, in first-seen order."""
    return list(dict.fromkeys(s.site for s in saes))


def check_sites(lm, saes: Sequence[TrainedSAE]) -> None:
    """Every SAE must name a hook site of `lm` (error names the SAE, its site, valid names)."""
    valid = lm.hook_names()
    for sae in saes:
        if not sae.site:
            raise ValueError(f"SAE {sae.name} ({sae.source}) records no hook site; it cannot "
                             "be spliced into the LM")
        if sae.site not in valid:
            raise ValueError(f"SAE {sae.name} ({sae.source}): site {sae.site!r} is not a hook "
                             f"site of the LM; valid names are: {', '.join(valid)}")


def site_means(lm, tokens, sites: Sequence[str], contexts: Sequence[int], *,
               batch_contexts: int = 32) -> dict[str, np.ndarray]:
    """{site: [d] float32} mean activation over the counted positions of `contexts`."""

    @jax.jit
    def masked_sum(acts, mask):
        return {s: jnp.sum(jnp.where(mask[..., None], a.astype(F32), 0.0), axis=(0, 1))
                for s, a in acts.items()}

    sums, n = None, 0
    for b in site_batches(lm, tokens, sites, contexts, batch_contexts=batch_contexts):
        s = masked_sum(b.acts, jnp.asarray(b.mask))
        sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
        n += int(b.mask.sum())
    if n == 0:
        raise ValueError(f"no counted positions in the {len(contexts)} contexts evaluated")
    return {s: np.asarray(v, np.float32) / n for s, v in jax.device_get(sums).items()}


def _ce_kl(logits: jax.Array, logp_clean: jax.Array, targets: jax.Array,
           pred_mask: jax.Array) -> dict:
    """Summed CE and KL(clean ‖ this) over counted predictions. logits [B, T, V];
    logp_clean [B, T-1, V]; targets, pred_mask [B, T-1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(F32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp), axis=-1)
    return {"ce": jnp.sum(jnp.where(pred_mask, nll, 0.0)),
            "kl": jnp.sum(jnp.where(pred_mask, kl, 0.0))}


def _sae_batch(sae: TrainedSAE, params: dict, x: jax.Array, mean: jax.Array, mask: jax.Array):
    """One SAE on one batch's site activations x [B, T, d]: (x̂ [B, T, d] in x's dtype,
    sparsity scalar sums, sparsity counts) -- see `saejax.eval.sparsity.batch_sums`."""
    if x.shape[-1] != sae.d_in:
        raise ValueError(f"SAE {sae.name} ({sae.source}) has d_in {sae.d_in} but site "
                         f"{sae.site} activations are [B, T, {x.shape[-1]}]")
    f = sae.encode(params, x)
    x_hat = sae.decode(params, f)
    sums, counts = batch_sums(x.reshape(-1, sae.d_in), x_hat.reshape(-1, sae.d_in),
                              sae.fired(params, f).reshape(-1, sae.n_features), mean,
                              mask.reshape(-1))
    return x_hat.astype(x.dtype), sums, counts


def make_step(lm, saes: Sequence[TrainedSAE]):
    """(jitted step, lm_state). step(lm_state, sae_params, means, counts, tokens, mask) ->
    (counts + this batch's counts, this batch's scalar sums); counts is donated.

    sae_params: [params dict per SAE]; means: {site: [d]}; counts: per SAE
    {"fire_count", "l0_count"} int32; tokens [B, T] int32; mask [B, T] bool."""
    graphdef, lm_state = nnx.split(lm)
    sites = unique_sites(saes)

    def step(lm_state, sae_params, means, counts, tokens, mask):
        model = nnx.merge(graphdef, lm_state)
        logits, cache = model.run(tokens, cache=sites, logits=True)
        targets, pred_mask = tokens[:, 1:], mask[:, :-1]
        logp_clean = jax.nn.log_softmax(logits[:, :-1].astype(F32), axis=-1)

        def spliced(site: str, values: jax.Array) -> dict:
            """{"ce", "kl"} [K] sums with the site's activation replaced by values[k] [B, T, d]
            at counted positions. lax.map traces one forward per site (not per splice) and runs
            one splice at a time (one [B, T, vocab] at a time)."""
            def one(value):
                def fn(x):
                    return jnp.where(mask[..., None], value, x)
                return _ce_kl(model.run(tokens, splices={site: fn})[0], logp_clean, targets,
                              pred_mask)
            return jax.lax.map(one, values)

        scalars = {"clean_ce": _ce_kl(logits, logp_clean, targets, pred_mask)["ce"],
                   "sites": {}, "saes": [None] * len(saes)}
        new_counts = [None] * len(saes)
        for site in sites:
            x = cache[site]
            values = [jnp.zeros_like(x), jnp.broadcast_to(means[site], x.shape).astype(x.dtype)]
            members = [i for i, sae in enumerate(saes) if sae.site == site]
            for i in members:
                # x is also what a spliced forward sees at this site (nothing upstream changes),
                # so each reconstruction is computed once, here.
                x_hat, scalars["saes"][i], c = _sae_batch(saes[i], sae_params[i], x,
                                                          means[site], mask)
                new_counts[i] = jax.tree.map(jnp.add, counts[i], c)
                values.append(x_hat)
            losses = spliced(site, jnp.stack(values))
            row = [{k: v[j] for k, v in losses.items()} for j in range(len(values))]
            scalars["sites"][site] = {"zero": row[0], "mean": row[1]}
            for j, i in enumerate(members):
                scalars["saes"][i] = {**scalars["saes"][i], **row[2 + j]}
        return new_counts, scalars

    return jax.jit(step, donate_argnums=3), lm_state


def _fold(total, pending: list):
    """total + the sum of pending per-batch scalar pytrees, on host in float64."""
    pending = jax.device_get(pending)
    batch_total = jax.tree.map(lambda *xs: np.sum(np.asarray(xs, np.float64)), *pending)
    return batch_total if total is None else jax.tree.map(np.add, total, batch_total)


def _token_batches(lm, tokens, contexts, batch_contexts):
    # site_batches with no sites: the same contexts, batching and mask rule as every other
    # analysis, while its forward stops before any compute (hooks.HookRun.check_start); the
    # step below runs its own forward.
    return site_batches(lm, tokens, (), contexts, batch_contexts=batch_contexts)


def splice_pass(lm, saes: Sequence[TrainedSAE], tokens, contexts: Sequence[int], *,
                batch_contexts: int = 32,
                means: dict[str, np.ndarray] | None = None) -> SpliceTotals:
    """Run the evaluation over `contexts` of the TokenDataset `tokens` for every SAE at once.

    means: {site: [d]} mean activations for mean ablation and FVU; computed in a first pass
    over the same contexts when None (a missing site is an error)."""
    if not saes:
        raise ValueError("no SAEs to evaluate")
    if len(contexts) == 0:
        raise ValueError("no contexts to evaluate")
    if len(contexts) * tokens.ctx_len > MAX_TOKENS:
        raise ValueError(f"{len(contexts)} contexts × {tokens.ctx_len} tokens exceed "
                         f"{MAX_TOKENS} positions (int32 per-feature counts); evaluate fewer")
    check_sites(lm, saes)
    sites = unique_sites(saes)
    if means is None:
        means = site_means(lm, tokens, sites, contexts, batch_contexts=batch_contexts)
    missing = [s for s in sites if s not in means]
    if missing:
        raise ValueError(f"means lacks site(s) {missing}")
    step, lm_state = make_step(lm, saes)
    params = [s.params for s in saes]
    dev_means = {s: jnp.asarray(means[s], F32) for s in sites}
    counts = [{"fire_count": jnp.zeros(s.n_features, jnp.int32),
               "l0_count": jnp.zeros(s.n_features + 1, jnp.int32)} for s in saes]
    total, pending, n_tokens, n_pred = None, [], 0, 0
    for b in _token_batches(lm, tokens, contexts, batch_contexts):
        counts, scalars = step(lm_state, params, dev_means, counts, jnp.asarray(b.tokens),
                               jnp.asarray(b.mask))
        pending.append(scalars)
        n_tokens += int(b.mask.sum())
        n_pred += int(b.mask[:, :-1].sum())
        if len(pending) >= FOLD_EVERY:
            total, pending = _fold(total, pending), []
    if pending:
        total = _fold(total, pending)
    if n_pred == 0:
        raise ValueError(f"no counted predictions in the {len(contexts)} contexts evaluated")
    counts = [{k: np.asarray(v, np.int64) for k, v in c.items()} for c in jax.device_get(counts)]
    return SpliceTotals(len(contexts), n_tokens, n_pred, total, counts,
                        {s: np.asarray(means[s], np.float32) for s in sites})


def loss_recovered(ablated: float, spliced: float, clean: float) -> float | None:
    """(L_ablated − L_splice) / (L_ablated − L_clean); None when the ablation changes nothing."""
    gap = ablated - clean
    return None if gap == 0 else (ablated - spliced) / gap


def summarize(totals: SpliceTotals, saes: Sequence[TrainedSAE]) -> dict:
    """Per-token means and derived metrics: {"n_contexts", "n_tokens", "n_predictions",
    "clean_loss", "sites": {site: ablation losses/KLs}, "saes": [per-SAE dict]}."""
    n = totals.n_predictions
    s = totals.sums
    clean = s["clean_ce"] / n
    sites = {site: {f"{kind}_ablation_{name}": abl[kind][key] / n
                    for kind in ("zero", "mean") for name, key in (("loss", "ce"), ("kl", "kl"))}
             for site, abl in s["sites"].items()}
    out = []
    for sae, sums, counts in zip(saes, s["saes"], totals.counts):
        loss = sums["ce"] / n
        abl = sites[sae.site]
        out.append({
            "name": sae.name, "path": sae.source, "site": sae.site, "arch": sae.arch,
            "d_in": sae.d_in, "n_features": sae.n_features,
            "loss": loss, "kl": sums["kl"] / n,
            "loss_recovered_zero": loss_recovered(abl["zero_ablation_loss"], loss, clean),
            "loss_recovered_mean": loss_recovered(abl["mean_ablation_loss"], loss, clean),
            **abl,
            **sparsity_summary(sums["sq_err"], sums["total_var"], counts["fire_count"],
                               counts["l0_count"], sae.d_in),
        })
    return {"n_contexts": totals.n_contexts, "n_tokens": totals.n_tokens,
            "n_predictions": n, "clean_loss": clean, "sites": sites, "saes": out}
