"""The sweep report (analysis.report): Pareto fronts on crafted points; write_report on a small
synthetic sweep of two shape groups writes every file, its CSV parses back to the rows' values,
its markdown marks the Pareto members; figures without variation are skipped and said so."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from saejax.analysis.report import check_rows, pareto, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pareto_on_crafted_points():
    pts = np.array([
        [1.0, 5.0],     # 0 lowest L0: optimal
        [2.0, 3.0],     # 1 optimal
        [3.0, 3.0],     # 2 dominated by 1 (same FVU, more L0)
        [4.0, 1.0],     # 3 lowest FVU: optimal
        [2.0, 4.0],     # 4 dominated by 1
        [5.0, 5.0],     # 5 dominated by everything
        [2.0, 3.0],     # 6 equal to 1: equal points dominate neither
        [np.nan, 0.0],  # 7 a frozen member: never optimal, dominates nothing
        [0.5, np.inf],  # 8 likewise
    ])
    expect = [True, True, False, True, False, False, True, False, False]
    assert pareto(pts).tolist() == expect
    # higher-better columns are negated by the caller: L0 against loss recovered
    assert pareto(np.c_[[1.0, 2.0, 3.0], -np.array([0.5, 0.9, 0.8])]).tolist() == [
        True, True, False]
    assert pareto(np.zeros((0, 2))).tolist() == []
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        pareto([1.0, 2.0])


def _rows():
    """8 members: 2 shape groups (n_features 512, 2048) x 2 λ x 2 seeds; loss recovered and
    densities on all."""
    rng = np.random.default_rng(0)
    rows = []
    for n in (512, 2048):
        for lam in (1e-3, 4e-3):
            for seed in (0, 1):
                l0 = 30.0 * (1e-3 / lam) * (1 + 0.1 * seed)
                fvu = 0.4 * (n / 512) ** -0.3 * l0 ** -0.3 * (1 + 0.05 * seed)
                density = rng.normal(-3, 1, 32)
                density[:2] = -np.inf
                rows.append({
                    "member": f"l1_coefficient={lam:g},n_features={n},seed={seed}",
                    "group": f"n_features={n}",
                    "hparams": {"sae.relu.l1_coefficient": lam, "sae.n_features": n,
                                "train.seed": seed},
                    "n_features": n, "tokens": 2048000,
                    "metrics": {"l0": l0, "fvu": fvu, "mse": 1.7 * fvu,
                                "dead_fraction": 2 / 32, "dense_fraction": 0.03 * seed,
                                "loss_recovered": 1 - fvu, "kl": 0.5 * fvu},
                    "log10_density": density.tolist()})
    return rows


def test_write_report_writes_every_file(tmp_path):
    rows = _rows()
    out = write_report(reversed(rows), tmp_path / "r")  # any input order

    assert set(out["figures"]) == {"frontier", "frontier_loss_recovered", "size", "density"}
    assert out["skipped"] == {}
    for path in out["figures"].values():
        assert open(path, "rb").read(8) == PNG_MAGIC
    # table order: size, then λ, then seed
    assert out["members"] == [r["member"] for r in rows]

    # Pareto members, by brute force: no other member with lower-or-equal L0 and FVU and one
    # of them lower
    def dominated(r):
        a = (r["metrics"]["l0"], r["metrics"]["fvu"])
        return any(o is not r and all(u <= v for u, v in zip(
            (o["metrics"]["l0"], o["metrics"]["fvu"]), a, strict=True))
            and (o["metrics"]["l0"], o["metrics"]["fvu"]) != a for o in rows)

    front = [r["member"] for r in rows if not dominated(r)]
    assert out["pareto"] == front and 0 < len(front) < len(rows)

    with open(out["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["member"] for t in table] == out["members"]
    for r, t in zip(rows, table, strict=True):
        assert t["group"] == r["group"]
        assert float(t["sae.relu.l1_coefficient"]) == r["hparams"]["sae.relu.l1_coefficient"]
        assert int(t["train.seed"]) == r["hparams"]["train.seed"]
        assert int(t["n_features"]) == r["n_features"] and int(t["tokens"]) == r["tokens"]
        for k, v in r["metrics"].items():
            assert float(t[k]) == v, k  # exact: floats are written by repr
        assert t["pareto"] == ("true" if r["member"] in front else "false")
    assert "sae.n_features" not in table[0]  # the n_features column carries it

    md = open(out["markdown"]).read().splitlines()
    body = [line for line in md if line.startswith("| ") and "---" not in line][1:]
    assert len(body) == len(rows)
    for r, line in zip(rows, body, strict=True):
        on = r["member"] in front
        assert line.startswith(f"| **{r['member']}** |" if on else f"| {r['member']} |")
        assert line.endswith("| **all** |") == on


def test_write_report_skips_what_does_not_vary(tmp_path):
    rows = [r for r in _rows() if r["n_features"] == 512 and r["hparams"]["train.seed"] == 0]
    for r in rows:
        del r["log10_density"], r["metrics"]["loss_recovered"], r["metrics"]["kl"]
    frozen = dict(rows[1], member="frozen", metrics=dict(rows[1]["metrics"], fvu=float("nan"),
                                                         mse=None))
    out = write_report([*rows, frozen], tmp_path)

    assert set(out["figures"]) == {"frontier"}
    assert set(out["skipped"]) == {"frontier_loss_recovered", "size", "density"}
    assert "one dictionary size" in out["skipped"]["size"]
    assert "frozen" not in out["pareto"]
    table = {t["member"]: t for t in csv.DictReader(open(out["csv"], newline=""))}
    assert math.isnan(float(table["frozen"]["fvu"])) and table["frozen"]["mse"] == ""
    assert "loss_recovered" not in table["frozen"]

    same_l0 = [dict(r, metrics=dict(r["metrics"], l0=8.0)) for r in rows]
    out = write_report(same_l0, tmp_path / "k")
    assert out["skipped"]["frontier"] == "L0 does not vary across the sweep"


def test_rows_are_checked():
    good = _rows()[0]
    with pytest.raises(ValueError, match="no members"):
        check_rows([])
    with pytest.raises(ValueError, match="appears twice"):
        check_rows([good, good])
    bad = dict(good, metrics={"l0": 1.0})
    with pytest.raises(ValueError, match=r"member 'l1_coefficient=0.001.*lacks metrics"):
        check_rows([bad])
    with pytest.raises(ValueError, match="has no 'tokens'"):
        check_rows([{k: v for k, v in good.items() if k != "tokens"}])
