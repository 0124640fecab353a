"""`write_site`: an analysis directory -> a static feature-browser site that works from file://.

Chrome refuses fetch/XHR of file:// URLs, so the data is written as small JavaScript files that
the pages load with <script src>, each one calling a registration function of static/common.js:

    index.html, feature.html     the pages (feature.html#ID shows feature ID)
    static/                      their code and style, copied from saejax/browse/static
    data/meta.js                 SAEJAX.meta({...}): SAE summary, histogram edges, index chunks
    data/index/{i}.js            SAEJAX.chunk(i, {...}): CHUNK rows of the feature table, by column
    data/features/{b}.js         SAEJAX.features([...]): features with id // BUNDLE == b, each
                                 with its examples, histogram and logit effects

No file grows with the number of features: the index page loads the table chunk by chunk and
renders one page of rows at a time; a feature page loads only its own bundle. Bundles keep a
100k-feature site to a few thousand files (one file each would be 100k tiny files to copy).
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from tqdm import tqdm

from saejax.analysis.layout import INDEX, ROW_KEYS, load_analysis

CHUNK = 10_000
"""Feature-table rows per data/index/{i}.js file (~0.5 MB at 10k rows)."""
BUNDLE = 16
"""Features per data/features/{b}.js file (~15 kB a feature with 40 examples)."""
INDEX_COLUMNS = ROW_KEYS + ("score", "explanation")
_FEATURE_KEYS = set(ROW_KEYS) | {"top", "samples", "hist", "logits", "explanation", "score"}
_ANALYSIS_KEYS = {"format", "version", "sae", "tokens", "top_k", "n_samples", "hist_edges",
                  "features"}
STATIC = Path(__file__).parent / "static"
PAGES = ("index.html", "feature.html")
ASSETS = ("common.js", "index.js", "feature.js", "browse.css")
MARKER = ".saejax-site"


def write_site(analysis_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
               title: str | None = None, progress: bool = False) -> Path:
    """Write the browser for the analysis at analysis_dir into out_dir; return index.html's path.

    out_dir must be new, empty, or an earlier site (whose data is replaced). Features listed in
    analysis.json without a features/{id}.json get a page with their statistics only.
    progress: show a progress bar over the feature bundles (large analyses take minutes).
    """
    analysis_dir, out_dir = Path(analysis_dir), Path(out_dir)
    analysis = read_analysis(analysis_dir)
    title = title or f"{analysis['sae'].get('name') or analysis_dir.name} · saejax features"
    data = _fresh_data_dir(out_dir)
    rows = [{k: r[k] for k in ROW_KEYS} for r in analysis["features"]]
    write_features(analysis_dir, rows, len(analysis["hist_edges"]), data, progress=progress)
    chunks = write_index(rows, data)
    write_js(data / "meta.js", "meta", _meta(analysis, analysis_dir, rows, chunks, title))
    _write_pages(out_dir, title)
    return out_dir / "index.html"


# -- reading the analysis directory ---------------------------------------------------------------

def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_analysis(analysis_dir: Path) -> dict[str, Any]:
    """analysis.json, checked for the fields the browser reads (errors name the file and field)."""
    path = analysis_dir / INDEX
    a = load_analysis(analysis_dir)
    if len(a["hist_edges"]) < 2:
        raise ValueError(f"{path}: field 'hist_edges' needs at least 2 edges")
    seen = set()
    for i, row in enumerate(a["features"]):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"{path}: features[{i}] lacks {', '.join(missing)}")
        if not isinstance(row["id"], int) or row["id"] < 0 or row["id"] in seen:
            raise ValueError(f"{path}: features[{i}].id {row['id']!r} is not a new integer >= 0")
        seen.add(row["id"])
    return a


def read_feature(analysis_dir: Path, row: dict[str, Any], n_edges: int) -> dict[str, Any]:
    """features/{id}.json as the feature page reads it: known fields, histogram split into
    bins and under/overflow, other scalar fields under "extra". A missing file gives the row's
    statistics only, with "missing": true."""
    path = analysis_dir / "features" / f"{row['id']}.json"
    if not path.is_file():
        return {**row, "top": [], "samples": [], "hist": None, "logits": None,
                "explanation": None, "score": None, "extra": [], "missing": True}
    f = _load_json(path)
    if f.get("id") != row["id"]:
        raise ValueError(f"{path}: field 'id' is {f.get('id')!r}, expected {row['id']}")
    out = {k: f.get(k, row[k]) for k in ROW_KEYS}
    for key in ("top", "samples"):
        out[key] = f.get(key) or []
        for j, ex in enumerate(out[key]):
            _check_example(path, f"{key}[{j}]", ex)
    out["hist"] = _split_hist(path, (f.get("hist") or {}).get("counts"), n_edges)
    out["logits"] = f.get("logits")
    out["explanation"], out["score"] = f.get("explanation"), f.get("score")
    out["extra"] = scalar_fields(f, skip=_FEATURE_KEYS)
    return out


def _check_example(path: Path, where: str, ex: Any) -> None:
    for key in ("tokens", "acts", "focus", "act"):
        if not isinstance(ex, dict) or key not in ex:
            raise ValueError(f"{path}: {where} lacks field {key!r}")
    if len(ex["tokens"]) != len(ex["acts"]):
        raise ValueError(f"{path}: {where}.acts has {len(ex['acts'])} values for "
                         f"{len(ex['tokens'])} tokens")
    if not 0 <= ex["focus"] < len(ex["tokens"]):
        raise ValueError(f"{path}: {where}.focus {ex['focus']} is outside its "
                         f"{len(ex['tokens'])} tokens")


def _split_hist(path: Path, counts: list[int] | None, n_edges: int) -> dict[str, Any] | None:
    """Counts over the bins between the edges, optionally with [underflow, ..., overflow]."""
    if counts is None:
        return None
    if len(counts) == n_edges - 1:
        return {"counts": counts, "under": 0, "over": 0}
    if len(counts) == n_edges + 1:
        return {"counts": counts[1:-1], "under": counts[0], "over": counts[-1]}
    raise ValueError(f"{path}: field 'hist.counts' has {len(counts)} counts for {n_edges} "
                     f"hist_edges (expected {n_edges - 1}, or {n_edges + 1} with under/overflow)")


def scalar_fields(d: dict[str, Any], skip=()) -> list[list[Any]]:
    """[[key, value]] of d's scalars (not nulls), one level of nested dicts as "key.sub", and
    short lists of scalars as text: shown generically, so new fields appear in the browser."""
    out = []
    for k, v in d.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            out += [[f"{k}.{k2}", v2] for k2, v2 in v.items() if v2 is not None and _is_scalar(v2)]
        elif isinstance(v, list):
            if len(v) <= 8 and all(_is_scalar(x) for x in v):
                out.append([k, ", ".join(str(x) for x in v)])
        elif v is not None and _is_scalar(v):
            out.append([k, v])
    return out


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


# -- writing ------------------------------------------------------------------------------------

def compact(x: Any) -> Any:
    """Floats to 4 significant digits (all the pages show): data files ~half the size."""
    if isinstance(x, float):
        return float(f"{x:.4g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: compact(v) for k, v in x.items()}
    if isinstance(x, list):
        return [compact(v) for v in x]
    return x


def write_js(path: Path, fn: str, *args: Any) -> None:
    """`SAEJAX.fn(args...);` with the args as JSON. JSON is valid JavaScript (NaN and Infinity
    included: Python writes them as the JS globals of those names); U+2028/9 are escaped for
    older parsers. Strings stay data: a data file is never parsed as HTML."""
    body = ",".join(json.dumps(a, ensure_ascii=False, separators=(",", ":")) for a in args)
    body = body.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    path.write_text(f"SAEJAX.{fn}({body});\n", encoding="utf-8")


def write_features(analysis_dir: Path, rows: list[dict[str, Any]], n_edges: int,
                   data_dir: Path, progress: bool = False) -> None:
    """data/features/{b}.js bundles, one bundle in memory at a time. Each feature gets its
    prev/next in the analysis's order; each row gets the feature's explanation and score."""
    (data_dir / "features").mkdir()
    bundles: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        bundles.setdefault(row["id"] // BUNDLE, []).append(i)
    for b, members in tqdm(bundles.items(), desc="feature pages", unit="bundle",
                           disable=not progress):
        features = []
        for i in members:
            f = read_feature(analysis_dir, rows[i], n_edges)
            rows[i]["explanation"], rows[i]["score"] = f["explanation"], f["score"]
            f["prev"] = rows[i - 1]["id"] if i > 0 else None
            f["next"] = rows[i + 1]["id"] if i + 1 < len(rows) else None
            features.append(compact(f))
        write_js(data_dir / "features" / f"{b}.js", "features", features)


def write_index(rows: list[dict[str, Any]], data_dir: Path, chunk: int = CHUNK) -> list[str]:
    """The feature table as data/index/{i}.js files of `chunk` rows, column by column; returns
    their paths relative to the site root, in order."""
    (data_dir / "index").mkdir(exist_ok=True)
    names = []
    for i, lo in enumerate(range(0, len(rows), chunk)):
        part = rows[lo:lo + chunk]
        cols = {k: [compact(r.get(k)) for r in part] for k in INDEX_COLUMNS}
        write_js(data_dir / "index" / f"{i}.js", "chunk", i, cols)
        names.append(f"data/index/{i}.js")
    return names


def _meta(analysis: dict[str, Any], analysis_dir: Path, rows: list[dict[str, Any]],
          chunks: list[str], title: str) -> dict[str, Any]:
    sae, tokens = analysis["sae"], analysis["tokens"]
    n_dead = sum(1 for r in rows if r["n_fired"] == 0)
    arch = sae.get("arch")
    if arch == "topk" and sae.get("k") is not None:
        arch = f"topk (k = {sae['k']})"
    summary = [["SAE", sae.get("name")], ["architecture", arch], ["site", sae.get("site")],
               ["language model", sae.get("lm_path")], ["SAE source", sae.get("source")],
               ["features", sae.get("n_features")], ["features analysed", len(rows)],
               ["dead (never fired)", n_dead], ["tokens analysed", tokens.get("n_tokens")],
               ["token dataset", tokens.get("path")], ["contexts", tokens.get("contexts")],
               ["top examples / random samples", f"{analysis.get('top_k')} / "
                                                  f"{analysis.get('n_samples')}"]]
    known = {"name", "arch", "k", "site", "lm_path", "source", "n_features"}
    summary += [[f"sae.{k}", v] for k, v in scalar_fields(sae, skip=known)]
    summary += [[f"tokens.{k}", v] for k, v in
                scalar_fields(tokens, skip={"n_tokens", "path", "contexts"})]
    summary += scalar_fields(analysis, skip=_ANALYSIS_KEYS)
    eval_path = analysis_dir / "eval.json"
    evaluation = scalar_fields(_load_json(eval_path)) if eval_path.is_file() else None
    return {"title": title, "summary": summary, "eval": evaluation,
            "hist_edges": analysis["hist_edges"], "n_rows": len(rows), "n_dead": n_dead,
            "first_id": rows[0]["id"] if rows else None, "chunks": chunks, "bundle": BUNDLE}


def _fresh_data_dir(out_dir: Path) -> Path:
    """out_dir/data, empty. Only a new or empty directory, or an earlier site (even a half-written
    one: the MARKER file comes first), is written to; an earlier site's data is removed, since
    stale feature files would otherwise linger."""
    data = out_dir / "data"
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
            raise FileExistsError(f"{out_dir} is not empty and is not a feature-browser site "
                                  f"(no {MARKER}); refusing to write into it")
        shutil.rmtree(data, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("a saejax feature-browser site (saejax.browse.write_site)\n")
    data.mkdir()
    return data


def _write_pages(out_dir: Path, title: str) -> None:
    for page in PAGES:
        text = (STATIC / page).read_text(encoding="utf-8")
        (out_dir / page).write_text(text.replace("{{title}}", html.escape(title)),
                                    encoding="utf-8")
    (out_dir / "static").mkdir(exist_ok=True)
    for asset in ASSETS:
        shutil.copyfile(STATIC / asset, out_dir / "static" / asset)
