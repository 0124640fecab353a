"""`sae.relu.target_l0`: λ is adapted during training until the L0 reaches the target, from a
starting λ far too small and far too large."""

import json

import pytest

from saejax.config import load_config
from saejax.train.loop import train


@pytest.mark.parametrize("start_lambda", [1e-3, pytest.param(0.3, marks=pytest.mark.slow)])
def test_target_l0_reaches_the_target(tmp_path, start_lambda):
    cfg = load_config(None, [
        "sae.d_in=32", "sae.n_features=128", "data.n_true_features=64", "data.p_active=0.05",
        f"sae.relu.l1_coefficient={start_lambda}", "sae.relu.target_l0=8",
        "train.steps=800", "train.batch_size=256", "train.log_every=100",
        "train.checkpoint_every=800", f"train.run_dir={tmp_path}", "train.progress=false"])
    summary = train(cfg, quiet=True)
    assert 6 <= summary["l0"] <= 10.5, summary
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lam = [r["l1_coefficient"] for r in records if "l1_coefficient" in r]
    moved = lam[-1] / start_lambda
    assert moved > 2 if start_lambda < 1e-2 else moved < 0.5, lam
