"""The rows of a sweep report (`saejax.analysis.report`) from run directories: one per member
(a single SAE's run is one row), with its swept values, its held-out summary from
metrics.jsonl, the density histogram of its last logging window and, given an evaluation
pass through the LM (`saejax.eval.run.evaluate`), loss recovered and KL on held-out text.

    rows = run_rows(["runs/sweep"])                    # training's held-out metrics
    rows = run_rows(["runs/sweep"], evaluated=evaluate(members("runs/sweep"), tokens))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from saejax.runs import read_config
from saejax.sweep import FILENAME as SWEEP_FILE
from saejax.typedconfig import parse_override, read_yaml


def _records(run_dir: Path) -> list[dict]:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
    return records


def _densities(hist: dict) -> list[float]:
    """Per-feature log10 densities standing for a logged histogram: each counted feature at its
    bin's centre, the never-firing ones at -inf (what density.png draws)."""
    edges = np.asarray(hist["log10_edges"], float)
    centres = (edges[:-1] + edges[1:]) / 2
    values = np.repeat(centres, np.asarray(hist["counts"], int))
    return [*([-np.inf] * int(hist["zero"])), *values.tolist()]


def _members(run_dir: Path) -> dict[str | None, list[str]]:
    """{member name: its overrides} of a sweep run; {None: []} for a single SAE's."""
    path = run_dir / SWEEP_FILE
    if not path.is_file():
        return {None: []}
    return dict(read_yaml(path, "the sweep's members")["members"])


def run_rows(run_dirs: Sequence[str | Path], evaluated: dict | None = None) -> list[dict]:
    """Report rows of every member of the runs (names prefixed by the run's folder name when
    several runs are given). `evaluated`: `evaluate`'s result for those members, whose L0, FVU,
    MSE, dead/dense fractions (on LM text) replace training's, with loss recovered and KL."""
    by_path = {e["path"]: e for e in (evaluated or {}).get("saes", [])}
    rows = []
    for run_dir in map(Path, run_dirs):
        records = _records(run_dir)
        summaries = {r.get("member"): r for r in records if r.get("event") == "summary"}
        last_log = {r.get("member"): r for r in records if "density_hist" in r}
        for name, overrides in _members(run_dir).items():
            spec = f"{run_dir}:{name}" if name else str(run_dir)
            cfg = read_config(spec)
            summary = summaries.get(name, {})
            metrics = {k: summary.get(k) for k in ("l0", "fvu", "mse", "dead_fraction")}
            metrics["dense_fraction"] = last_log.get(name, {}).get("dense_fraction")
            if spec in by_path:
                e = by_path[spec]
                metrics.update({k: e[k] for k in ("l0", "fvu", "mse", "dead_fraction",
                                                  "dense_fraction", "kl")},
                               loss_recovered=e["loss_recovered_zero"],
                               ce_loss_spliced=e["loss"])
            hparams = {"sae.arch": cfg.sae.arch, "sae.n_features": cfg.sae.n_features,
                       **dict(parse_override(o) for o in overrides)}
            label = name or run_dir.name
            rows.append({
                "member": f"{run_dir.name}/{label}" if len(run_dirs) > 1 and name else label,
                "group": f"{cfg.sae.arch} F={cfg.sae.n_features}",
                "hparams": hparams, "n_features": cfg.sae.n_features,
                "tokens": cfg.train.steps * cfg.train.batch_size, "metrics": metrics,
                **({"frozen_at": summary["frozen_at"]} if "frozen_at" in summary else {}),
                **({"log10_density": _densities(last_log[name]["density_hist"])}
                   if name in last_log else {}),
            })
    return rows

