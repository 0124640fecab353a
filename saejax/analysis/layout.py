"""The analysis directory's layout and its readers, without JAX (the browser reads it too).

    out_dir/analysis.json       the index: format, version, the SAE, the text, one row per feature
    out_dir/features/{id}.json  one feature: top examples, samples, histogram, logit effects,
                                explanation and score (written by `saejax.analysis.features`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT, VERSION = "saejax.analysis", 1
INDEX = "analysis.json"
FEATURES = "features"
ROW_KEYS = ("id", "n_fired", "density", "max_act", "mean_act")
"""The per-feature statistics every index row holds."""

_INDEX_FIELDS = {"sae": dict, "tokens": dict, "top_k": int, "n_samples": int,
                 "hist_edges": list, "features": list}


def load_analysis(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The index (analysis.json) of an analysis directory, checked for format and fields."""
    file = Path(out_dir) / INDEX
    if not file.is_file():
        raise FileNotFoundError(f"{out_dir} is not an analysis directory: no {INDEX}")
    with open(file, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{file}: format {index.get('format')!r} version "
                         f"{index.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    for name, kind in _INDEX_FIELDS.items():
        if not isinstance(index.get(name), kind):
            raise ValueError(f"{file}: field {name!r} missing or not a {kind.__name__}")
    return index


def feature(out_dir: str | os.PathLike, feature_id: int) -> dict[str, Any]:
    """One feature's record (features/{id}.json) of an analysis directory."""
    file = Path(out_dir) / FEATURES / f"{int(feature_id)}.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such feature in the analysis at {out_dir}")
    with open(file, encoding="utf-8") as f:
        return json.load(f)
