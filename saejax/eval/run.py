"""`saejax eval`: splice evaluation and held-out sparsity of one or more SAEs in one pass.

    results = evaluate(["runs/a", "runs/b"], "data/tokens", contexts="-2000:", out_dir="eval/")
    print(format_table(results))

writes eval/eval.json (everything `evaluate` returns) and eval/<sae name>_density.png.
`default_contexts` picks contexts the SAEs were not trained on (those after the contexts their
activation store harvested), for `saejax eval` and `saejax analyze` without --contexts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from saejax.eval.trained import TrainedSAE, load_sae
from saejax.files import file_safe, unique_names
from saejax.objstore import files_under, upload_files
from saejax.paths import as_path, is_url, join

EVAL_JSON = "eval.json"
DEFAULT_N_CONTEXTS = 2000
"""Contexts evaluated or analysed when none are named."""


def _manifest_sha256(tokens_dir: str) -> str | None:
    """sha256 of a token dataset's manifest (its identity, as a store's provenance records it),
    None when there is none."""
    from saejax.atomic import MANIFEST, sha256_file  # noqa: PLC0415

    path = join(tokens_dir, MANIFEST)
    return sha256_file(path) if as_path(path).is_file() else None


def _store_trained(store_path: str, tokens_sha: str) -> int | None:
    """Leading contexts of the dataset `tokens_sha` an activation store harvested (0: another
    dataset; None: the store does not say or cannot be read)."""
    from saejax.data.store import read_store_manifest  # noqa: PLC0415

    try:
        m = read_store_manifest(store_path)
    except (OSError, ValueError):
        return None
    recorded = (m["provenance"].get("tokens") or {}).get("manifest_sha256")
    if recorded is None:
        return None
    return m["n_contexts"] if recorded == tokens_sha else 0


def trained_contexts(sae_path: str | os.PathLike, tokens_sha: str, n_contexts: int) -> int | None:
    """How many leading contexts of the token dataset identified by `tokens_sha` (of its
    n_contexts) the SAE at sae_path was trained on, as far as it records: a store run its
    harvested prefix, an lm run all of them, a run on another dataset or on synthetic data 0;
    None when unknown (.npy activations, a SAELens folder not exported from a store run)."""
    import json  # noqa: PLC0415

    from saejax.export import CFG_FILENAME  # noqa: PLC0415
    from saejax.runs import is_run, read_config  # noqa: PLC0415

    path = as_path(sae_path)
    if not is_run(path):  # a SAELens folder: its dataset_path may be a store
        try:
            meta = json.loads((path / CFG_FILENAME).read_text()).get("metadata") or {}
        except (OSError, ValueError):
            return None
        store = meta.get("dataset_path")
        return _store_trained(store, tokens_sha) if isinstance(store, str) else None
    data = read_config(path).data
    if data.source == "store":
        return _store_trained(data.store_path, tokens_sha)
    if data.source == "lm":
        sha = _manifest_sha256(data.tokens_path)
        return None if sha is None else (n_contexts if sha == tokens_sha else 0)
    return 0 if data.source == "synthetic" else None


def default_contexts(sae_paths: Sequence[str | os.PathLike], tokens_path: str | os.PathLike,
                     fallback: str) -> tuple[str, str]:
    """(START:STOP, why) for SAEs evaluated on the token dataset at tokens_path when no contexts
    are named: the DEFAULT_N_CONTEXTS contexts after the last one any of them trained on, when
    some are left; else `fallback`, with a sentence saying whether it overlaps training data."""
    from saejax.text.tokens import read_manifest  # noqa: PLC0415

    tokens_path = os.fspath(tokens_path)
    n = read_manifest(tokens_path)["n_contexts"]
    sha = _manifest_sha256(tokens_path)
    seen = [trained_contexts(p, sha, n) for p in sae_paths]
    start = max((k for k in seen if k is not None), default=0)
    if start >= n:
        return fallback, (f"the SAEs were trained on every context of {tokens_path}, so these "
                          f"overlap their training data (harvest with --holdout N to keep some "
                          f"out, or pass --contexts)")
    if start > 0:
        return (f"{start}:{min(start + DEFAULT_N_CONTEXTS, n)}",
                f"held out: the SAEs were trained on contexts 0:{start} of {tokens_path}")
    if None in seen:
        return fallback, ("which contexts the SAEs were trained on is not recorded; pass "
                          "--contexts to choose")
    return fallback, f"held out: the SAEs were not trained on {tokens_path}"


def _lm_key(path: str) -> str:
    """A comparable form of an LM path: the real path of a local directory, else the hub id."""
    return os.path.realpath(path) if os.path.isdir(path) else path


def resolve_lm(saes: Sequence[TrainedSAE], lm_path: str | None = None) -> str:
    """The LM to evaluate on: `lm_path` when given, else the one every SAE records (errors name
    the SAE with no recorded LM, or the two SAEs whose LMs differ)."""
    if lm_path is not None:
        return str(lm_path)
    for sae in saes:
        if not sae.lm_path:
            raise ValueError(f"SAE {sae.name} ({sae.source}) records no LM; pass lm_path")
    first = saes[0]
    for sae in saes[1:]:
        if _lm_key(sae.lm_path) != _lm_key(first.lm_path):
            raise ValueError(
                f"SAEs were trained on different LMs: {first.name} ({first.source}) on "
                f"{first.lm_path!r}, {sae.name} ({sae.source}) on {sae.lm_path!r}; evaluate "
                "them separately or pass lm_path")
    return first.lm_path


def _unique_names(saes: list[TrainedSAE]) -> list[TrainedSAE]:
    """Names safe as file names and distinct (a repeated name gets -2, -3, ...)."""
    names = unique_names(file_safe(sae.name, "sae") for sae in saes)
    return [dataclasses.replace(sae, name=name) for sae, name in zip(saes, names)]


def evaluate(sae_paths: Sequence[str | os.PathLike], tokens_path: str | os.PathLike,
             contexts: str = "-2000:", batch_contexts: int = 32,
             lm_path: str | None = None, out_dir: str | os.PathLike | None = None) -> dict:
    """Evaluate SAEs (run directories or SAELens folders) on held-out contexts of a token dataset.

    contexts: 'START:STOP' context ids (python-slice style; the default takes the last 2,000).
    lm_path: the LM to splice into; by default the one the SAEs record (they must agree).
    Returns `saejax.eval.splice.summarize`'s dict plus lm_path, tokens_path, contexts; with
    out_dir also writes eval.json and one density PNG per SAE (named in its "density_png").
    """
    from saejax.eval.density_plot import plot_density  # noqa: PLC0415
    from saejax.eval.splice import splice_pass, summarize  # noqa: PLC0415
    from saejax.lm.load import load_lm  # noqa: PLC0415
    from saejax.lm.stream import parse_contexts  # noqa: PLC0415
    from saejax.text.tokens import TokenDataset  # noqa: PLC0415

    if not sae_paths:
        raise ValueError("no SAEs to evaluate")
    saes = _unique_names([load_sae(p) for p in sae_paths])
    lm_path = resolve_lm(saes, lm_path)
    tokens = TokenDataset(tokens_path)
    lm = load_lm(lm_path)
    if tokens.vocab_size > lm.cfg.vocab_size:
        raise ValueError(f"token dataset {tokens_path} has vocabulary {tokens.vocab_size}, more "
                         f"than the LM {lm_path}'s {lm.cfg.vocab_size}")
    ids = parse_contexts(contexts, len(tokens))
    totals = splice_pass(lm, saes, tokens, ids, batch_contexts=batch_contexts)
    results = {"lm_path": str(lm_path), "tokens_path": str(tokens_path), "contexts": contexts,
               **summarize(totals, saes)}
    if out_dir is not None:
        from saejax.atomic import json_safe, write_json_atomic  # noqa: PLC0415

        with _local_dir(out_dir) as out:
            for sae, entry, counts in zip(saes, results["saes"], totals.counts):
                png = plot_density(counts["fire_count"], totals.n_tokens,
                                   out / f"{sae.name}_density.png", title=sae.name)
                entry["density_png"] = png.name
            write_json_atomic(str(out / EVAL_JSON), json_safe(results))
    return results


@contextlib.contextmanager
def _local_dir(out_dir: str | os.PathLike):
    """A local directory to write evaluate's files into: `out_dir` itself (created), or for a URL
    a temporary one whose files are uploaded under it when the block ends, eval.json last (what
    was there beside them stays)."""
    if not is_url(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="saejax-eval-") as tmp:
        yield Path(tmp)
        figures = [name for name in files_under(tmp) if name != EVAL_JSON]
        upload_files(tmp, os.fspath(out_dir), figures)
        upload_files(tmp, os.fspath(out_dir), [EVAL_JSON])


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_table(results: dict) -> str:
    """A short plain-text table of `evaluate`'s results, one row per SAE."""
    lines = [f"clean loss {results['clean_loss']:.4f} nats over {results['n_predictions']:,} "
             f"predictions ({results['n_contexts']:,} contexts, {results['n_tokens']:,} tokens)"]
    head = (f"{'sae':<20} {'site':<26} {'features':>8} {'L0':>7} {'FVU':>7} {'loss':>7} "
            f"{'KL':>7} {'rec/zero':>8} {'rec/mean':>8} {'dead':>6} {'ultralow':>8} "
            f"{'dense':>6}")
    lines += [head, "-" * len(head)]
    for r in results["saes"]:
        ultralow = _pct(r["ultralow_fraction"]) if r["ultralow_resolvable"] else "n/r"
        lines.append(
            f"{r['name']:<20.20} {r['site']:<26.26} {r['n_features']:>8} {r['l0']:>7.2f} "
            f"{r['fvu']:>7.4f} {r['loss']:>7.4f} {r['kl']:>7.4f} "
            f"{_pct(r['loss_recovered_zero']):>8} {_pct(r['loss_recovered_mean']):>8} "
            f"{_pct(r['dead_fraction']):>6} {ultralow:>8} {_pct(r['dense_fraction']):>6}")
    for site, a in results["sites"].items():
        lines.append(f"{site}: zero-ablation loss {a['zero_ablation_loss']:.4f}, "
                     f"mean-ablation loss {a['mean_ablation_loss']:.4f}")
    if any(not r["ultralow_resolvable"] for r in results["saes"]):
        lines.append("ultralow n/r: 1e-6 density is not resolvable with <= 1e6 tokens")
    return "\n".join(lines)
