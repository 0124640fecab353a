"""The Towards Monosemanticity one-layer pipeline, end to end on local data:

    corpus -> byte-level BPE -> token contexts -> one-layer ReLU LM -> MLP activations -> SAE

    python experiments/monosemanticity_1l/run.py --install       # first time: fetch the sources
    python experiments/monosemanticity_1l/run.py                 # later: resumes where it stopped

Every stage writes into --work (default data/mono1l, ignored by git) and is skipped when its
output is complete, and the LM and SAE runs resume from their checkpoints, so an interrupted
pipeline is continued by running it again. Stage timings and the figures the README reports go
to <work>/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SITE = "blocks.0.mlp.hook_post"


def stage(results: dict, name: str, done: bool, fn) -> None:
    """Run fn() unless `done`, recording its wall time."""
    if done:
        print(f"[{name}] already done")
        return
    print(f"[{name}] running")
    t0 = time.perf_counter()
    out = fn()
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    if isinstance(out, dict):
        results[name] = out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="data/mono1l")
    p.add_argument("--install", action="store_true")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--lm-steps", type=int, default=5000)
    p.add_argument("--lm-batch", type=int, default=32)
    p.add_argument("--harvest-contexts", type=int, default=12_000)
    p.add_argument("--sae-features", type=int, default=4096)
    p.add_argument("--sae-steps", type=int, default=6000)
    p.add_argument("--sae-batch", type=int, default=1024)
    p.add_argument("--l1", type=float, default=1e-2)
    p.add_argument("--until", choices=["lm", "sae"], default="sae",
                   help="stop after this stage")
    args = p.parse_args()

    from saejax.config import load_config
    from saejax.data.harvest import harvest
    from saejax.train.lm import load_lm_train_config, train_lm
    from saejax.text.corpus import Corpus
    from saejax.text.tokenizer import load_tokenizer, train_bpe
    from saejax.text.tokens import write_token_dataset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res_file = work / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    corpus = work / "corpus" / "corpus.jsonl"
    tok_dir, tokens, acts = work / "tokenizer", work / "tokens", work / "acts"
    lm_run, sae_run = work / "lm", work / "sae"

    stage(results, "corpus", corpus.exists(), lambda: subprocess.run(
        [sys.executable, str(HERE / "corpus.py"), "--out", str(corpus.parent)]
        + (["--install"] if args.install else []), check=True) and None)
    docs = Corpus([str(corpus)])
    stage(results, "tokenizer", (tok_dir / "tokenizer.json").exists(),
          lambda: train_bpe(docs, args.vocab, tok_dir) and None)
    stage(results, "tokens", (tokens / "manifest.json").exists(), lambda: {
        "n_contexts": len(write_token_dataset(docs, load_tokenizer(str(tok_dir)), tokens,
                                              ctx_len=args.ctx, progress=True))})
    lm_cfg = load_lm_train_config(None, [
        f"data.tokens={tokens}", f"data.tokenizer={tok_dir}", f"train.run_dir={lm_run}",
        f"train.steps={args.lm_steps}", f"train.batch_size={args.lm_batch}"])
    stage(results, "lm", (lm_run / "hf" / "config.json").exists(), lambda: train_lm(lm_cfg))
    if args.until == "lm":
        return _save(res_file, results)
    stage(results, "harvest", (acts / "manifest.json").exists(), lambda: {
        "n_rows": harvest(lm_run / "hf", tokens, acts, [SITE], dtype="bfloat16",
                          max_contexts=args.harvest_contexts)["n_rows"]})
    from saejax.train.loop import train
    # The SAEs the evaluation compares: 512 twice (cross-seed matching), 1,024, and 4,096 (the
    # paper's A/1); 512 -> 1,024 -> 4,096 is the feature-splitting sequence.
    for name, n_features, seed in [("sae_512", 512, 0), ("sae_512_seed1", 512, 1),
                                   ("sae_1024", 1024, 0), ("sae", args.sae_features, 0)]:
        cfg = load_config(None, sae_overrides(args, acts, work / name, n_features, seed))
        stage(results, name, (work / name / "done").exists(),
              lambda cfg=cfg, name=name: _sae(train, cfg, work / name))
        _save(res_file, results)
    # Universality: a second LM (seed 1: other init and data order) and a 512-feature SAE on it.
    lm_b, acts_b = work / "lm_seed1", work / "acts_seed1"
    cfg_b = load_lm_train_config(None, [
        f"data.tokens={tokens}", f"data.tokenizer={tok_dir}", f"train.run_dir={lm_b}",
        f"train.steps={args.lm_steps}", f"train.batch_size={args.lm_batch}", "train.seed=1"])
    stage(results, "lm_seed1", (lm_b / "hf" / "config.json").exists(), lambda: train_lm(cfg_b))
    stage(results, "harvest_seed1", (acts_b / "manifest.json").exists(), lambda: {
        "n_rows": harvest(lm_b / "hf", tokens, acts_b, [SITE], dtype="bfloat16",
                          max_contexts=args.harvest_contexts)["n_rows"]})
    cfg = load_config(None, sae_overrides(args, acts_b, work / "sae_512_lm_seed1", 512, 0))
    stage(results, "sae_512_lm_seed1", (work / "sae_512_lm_seed1" / "done").exists(),
          lambda: _sae(train, cfg, work / "sae_512_lm_seed1"))
    _save(res_file, results)


def sae_overrides(args, acts: Path, run_dir: Path, n_features: int, seed: int) -> list[str]:
    """One recipe for every SAE of the experiment: scaled inputs (E||x||^2 = d), lambda warm-up,
    resampling at 25/50/75% of training with a window of 1/8 of it (the paper's proportions)."""
    return [
        "data.source=store", f"data.store_path={acts}", f"data.site={SITE}", "sae.d_in=512",
        f"sae.n_features={n_features}", f"sae.relu.l1_coefficient={args.l1}",
        "sae.relu.target_l0=0",  # the recipe's fixed lambda (the defaults adapt it to L0 16)
        "sae.scale_inputs=true", "sae.relu.l1_warmup_fraction=0.05",
        f"train.steps={args.sae_steps}", f"train.batch_size={args.sae_batch}",
        f"train.seed={seed}", f"train.run_dir={run_dir}", "optim.lr=1e-3",
        "resample.at_fractions=[0.25,0.5,0.75]", f"resample.window_steps={args.sae_steps // 8}",
        "resample.n_inputs=131072", "train.checkpoint_every=1000"]


def _save(res_file: Path, results: dict) -> None:
    res_file.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


def _sae(train, cfg, run_dir: Path) -> dict:
    summary = train(cfg)
    (run_dir / "done").write_text("")
    return summary


if __name__ == "__main__":
    main()
