"""`compare`: match the features of two SAEs, or trace feature splitting across several.

    compare([a, b], tokens, out)            best matches both ways (activation correlation,
                                            masked cosine, decoder cosine) -> out/compare.json
    compare([a, b], tokens, out, neurons=True)
                                            + the same numbers for the raw neurons of the two
                                            SAEs' LMs at the site (the paper's baseline)
    compare([s1, s2, s3, ...], tokens, out) SAEs of increasing size: the family tree ->
                                            out/splitting.json, out/splitting.png

Two SAEs of different sizes also get the (two-level) tree. Every statistic comes from one pass
over the same contexts and positions (`saejax.lm.stream`), each LM run once per batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from saejax.analysis.matching import (MEASURES, FeatureSet, best_matches, decoder_cosine,
                                      neuron_features, sae_features, stream_similarities)
from saejax.analysis.splitting import draw_family, tree_from_similarities
from saejax.atomic import json_safe, write_text_atomic
from saejax.files import unique_names


def _check_tokenizers(lm_paths: Sequence[str], tokens) -> None:
    """Token ids must mean the same text to every LM: same vocabulary as the token dataset."""
    from saejax.lm import lm_config  # noqa: PLC0415

    vocab = {p: lm_config(p).vocab_size for p in lm_paths}
    if len(set(vocab.values())) > 1:
        raise ValueError(f"the LMs have different vocabularies ({vocab}): the same token ids "
                         "would be different text to them")
    for path, v in vocab.items():
        if v < tokens.vocab_size:
            raise ValueError(f"LM {path} has vocab_size {v} but the token dataset {tokens.path} "
                             f"was made with a {tokens.vocab_size}-token tokenizer")


def _check_saes(saes) -> None:
    if len(saes) < 2:
        raise ValueError(f"compare needs at least 2 SAEs, got {len(saes)}")
    for s in saes:
        if not s.lm_path or not s.site:
            raise ValueError(f"SAE {s.source or s.name} does not record the LM and site it reads "
                             f"(lm_path={s.lm_path!r}, site={s.site!r})")
        if s.d_in != saes[0].d_in:
            raise ValueError(f"SAEs must read activations of the same width: {saes[0].name} has "
                             f"d_in={saes[0].d_in}, {s.name} has d_in={s.d_in}")
    sizes = [s.n_features for s in saes]
    if len(saes) > 2 and any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"3 or more SAEs trace feature splitting and must be given in "
                         f"increasing size; got sizes {sizes}")


def _unique_names(sets: list[FeatureSet]) -> list[FeatureSet]:
    """Suffix repeated names (an SAE compared with itself) so tables and trees stay readable."""
    names = unique_names((s.name for s in sets), "#")
    return [replace(s, name=name) for s, name in zip(sets, names)]


def _both_ways(sim, min_fires: int) -> dict:
    return {m: dict(zip(("a_to_b", "b_to_a"), sim.best_matches(m, min_fires)))
            for m in MEASURES}


def _summaries(ways: dict) -> dict:
    return {m: {d: bm.summary() for d, bm in v.items()} for m, v in ways.items()}


def compare(sae_paths: Sequence[str | Path], tokens_path: str | Path, out_dir: str | Path,
            contexts: str = "0:2000", batch_contexts: int = 32, neurons: bool = False,
            threshold: float = 0.4, labels: Mapping | None = None, min_fires: int = 10,
            skip_bos: bool = True) -> dict:
    """Compare SAEs over the token dataset at `tokens_path`; write results under `out_dir`.

    contexts: 'START:STOP' context ids; min_fires: a feature (or neuron) counts as alive, and is
    matched, when it fires on at least this many counted positions; threshold: masked cosine an
    edge of the family tree needs; labels: {level index or SAE name: {feature id: text}} for the
    figure. Returns what compare.json / splitting.json hold (the JSON of the tree under
    "splitting").
    """
    from saejax.eval.trained import load_sae  # noqa: PLC0415
    from saejax.lm.stream import parse_contexts  # noqa: PLC0415
    from saejax.text.tokens import TokenDataset  # noqa: PLC0415

    if len(sae_paths) < 2:
        raise ValueError(f"compare needs at least 2 SAEs, got {len(sae_paths)}")
    saes = [load_sae(p) for p in sae_paths]
    _check_saes(saes)
    tokens = TokenDataset(tokens_path)
    _check_tokenizers(list(dict.fromkeys(s.lm_path for s in saes)), tokens)
    ids = parse_contexts(contexts, len(tokens))
    if not len(ids):
        raise ValueError(f"contexts {contexts!r} selects no context of {len(tokens)}")

    sets = _unique_names([sae_features(s) for s in saes])
    pairs = [(k, k + 1) for k in range(len(sets) - 1)]
    if neurons:
        if len(saes) != 2:
            raise ValueError(f"neurons=True compares two SAEs' LMs; got {len(saes)} SAEs")
        sets += _unique_names([neuron_features(s.lm_path, s.site, s.d_in,
                                               f"neurons:{s.name}") for s in saes])
        pairs.append((2, 3))
    sims = stream_similarities(tokens, sets, pairs, ids, batch_contexts=batch_contexts,
                               skip_bos=skip_bos)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"saes": [{"name": f.name, "path": s.source, "lm_path": s.lm_path, "site": s.site,
                        "d_in": s.d_in, "n_features": s.n_features}
                       for f, s in zip(sets, saes)],
              "tokens": str(tokens_path), "contexts": contexts, "n_contexts": len(ids),
              "n_tokens": sims[0].n_tokens, "min_fires": min_fires}
    if len(saes) == 2:
        result.update(_pair_result(sets, saes, sims, min_fires))
        _write_json(out_dir / "compare.json", result)
    sizes = [s.n_features for s in saes]
    if all(b > a for a, b in zip(sizes, sizes[1:])):
        result["splitting"] = _splitting(sims[:len(saes) - 1], threshold, min_fires, labels,
                                         out_dir)
    return result


def _pair_result(sets, saes, sims, min_fires: int) -> dict:
    """Best-match summaries and per-feature matches of the two SAEs (and their neurons)."""
    ways = _both_ways(sims[0], min_fires)
    if saes[0].lm_path == saes[1].lm_path and saes[0].site == saes[1].site:
        dec = decoder_cosine(saes[0].params["W_dec"], saes[1].params["W_dec"])
        alive_a, alive_b = ways["correlation"]["a_to_b"].alive, ways["correlation"]["b_to_a"].alive
        names = (sets[0].name, sets[1].name)
        # Over the same alive features as the activation measures, so the numbers line up.
        ways["decoder_cosine"] = {
            "a_to_b": best_matches(dec, alive_a, alive_b, "decoder_cosine", names),
            "b_to_a": best_matches(dec.T, alive_b, alive_a, "decoder_cosine", names[::-1])}
        dec_note = None
    else:
        dec_note = "different LMs or sites: decoder directions live in different spaces"
    out = {"features": _summaries(ways), "decoder_cosine_note": dec_note,
           "per_feature": {m: {d: bm.to_json() for d, bm in v.items()} for m, v in ways.items()}}
    if len(sims) > 1:
        out["neurons"] = _summaries(_both_ways(sims[1], min_fires))
        out["neurons_note"] = ("same LM: the neuron baseline matches each neuron with itself"
                               if saes[0].lm_path == saes[1].lm_path else None)
    return out


def _splitting(sims, threshold: float, min_fires: int, labels, out_dir: Path) -> dict:
    tree = tree_from_similarities(sims, threshold, min_fires)
    data = tree.to_json()
    root = tree.pick_family()
    data["figure_root"] = list(root) if root else None
    if root is not None:
        draw_family(tree, *root, out_dir / "splitting.png", _normalise_labels(labels))
        data["figure"] = "splitting.png"
    else:
        data["figure"] = None
        data["figure_note"] = f"no feature has a parent with masked cosine >= {threshold}"
    _write_json(out_dir / "splitting.json", data)
    return data


def _normalise_labels(labels: Mapping | None) -> dict | None:
    """JSON-style keys ("0", "12") -> ints; SAE names stay strings."""
    if not labels:
        return None
    key = lambda k: int(k) if isinstance(k, str) and k.isdigit() else k  # noqa: E731
    return {key(lv): {int(f): str(t) for f, t in per.items()} for lv, per in labels.items()}


def _to_json(x, depth: int = 0) -> str:
    """Indented JSON, but a list of scalars on one line (per-feature arrays stay short)."""
    pad, end = "  " * (depth + 1), "\n" + "  " * depth
    if isinstance(x, dict) and x:
        items = [f"{pad}{json.dumps(k)}: {_to_json(v, depth + 1)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + end + "}"
    if isinstance(x, list) and any(isinstance(v, dict | list) for v in x):
        return "[\n" + ",\n".join(pad + _to_json(v, depth + 1) for v in x) + end + "]"
    return json.dumps(x, ensure_ascii=False)


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, _to_json(json_safe(obj)) + "\n")


def _fmt(v) -> str:
    return "   -  " if v is None or v != v else f"{v:6.3f}"


def format_summary(result: dict) -> str:
    """A short plain-text report of what `compare` returned, for the CLI."""
    saes = result["saes"]
    lines = [" vs ".join(f"{s['name']} ({s['n_features']})" for s in saes)
             + f" at {saes[0]['site']}: {result['n_tokens']:,} tokens "
             f"({result['n_contexts']} contexts), alive = fires >= {result['min_fires']}"]
    blocks = [("features", result.get("features")), ("neurons", result.get("neurons"))]
    if any(b for _, b in blocks):
        lines.append(f"{'best match':34s}{'A->B median':>12s}{'mean':>8s}"
                     f"{'B->A median':>13s}{'mean':>8s}{'alive A':>9s}{'alive B':>9s}")
    for what, block in blocks:
        for measure, ways in (block or {}).items():
            ab, ba = ways["a_to_b"], ways["b_to_a"]
            lines.append(f"{what + ' ' + measure.replace('_', ' '):34s}{_fmt(ab['median']):>12s}"
                         f"{_fmt(ab['mean']):>8s}{_fmt(ba['median']):>13s}{_fmt(ba['mean']):>8s}"
                         f"{ab['n_alive']:>9d}{ba['n_alive']:>9d}")
    for note in ("decoder_cosine_note", "neurons_note"):
        if result.get(note):
            lines.append(f"note: {result[note]}")
    if (sp := result.get("splitting")):
        sizes = " -> ".join(str(lv["n_features"]) for lv in sp["levels"])
        lines.append(f"splitting {sizes}: {sp['n_edges']} edges >= {sp['threshold']:g}, "
                     f"{sp['n_splits']} parents with 2+ children")
        if sp["top_splits"]:
            s = sp["top_splits"][0]
            kids = ", ".join(f"#{c} ({w:.2f})" for c, w in s["children"][:6])
            lines.append(f"  largest: {sp['levels'][s['level']]['name']} #{s['parent']} -> "
                         f"{kids}")
        if sp.get("figure"):
            lines.append(f"  figure: {sp['figure']}")
    return "\n".join(lines)

