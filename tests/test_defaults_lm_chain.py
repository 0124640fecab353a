"""The README's LM chain on a tiny world, with the SAE defaults: the SAE must beat ablating the
layer by a clear margin (the defaults are part of the product). Only the run's length and batch
size are set, for time."""

import json

from saejax import cli

SITE = "blocks.0.mlp.hook_post"


def test_readme_chain_with_default_sae_settings(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    words = ["cat", "dog", "bird", "fish", "sat", "ran", "flew", "swam", "on", "under", "the"]
    text.write_text("\n\n".join(" ".join(words[(i * 7 + j * (i % 5 + 1)) % len(words)]
                                         for j in range(12)) for i in range(600)))
    tokens, lm, acts, sae = (tmp_path / n for n in ("tokens", "lm", "acts", "sae"))
    assert cli.main(["tokenize", str(tokens), "--text", str(text), "--separator", "",
                     "--train-bpe", "300", "--ctx-len", "16"]) == 0
    assert cli.main(["train-lm", "--quiet", f"data.tokens={tokens}", f"train.run_dir={lm}",
                     "model.n_embd=32", "model.n_head=4", "model.n_inner=128", "train.steps=150",
                     "train.batch_size=32", "data.val_contexts=32", "train.log_every=50",
                     "train.checkpoint_every=150", "train.eval_every=0", "optim.warmup_steps=10",
                     "train.progress=false"]) == 0
    n_contexts = json.loads((tokens / "manifest.json").read_text())["n_contexts"]
    assert cli.main(["harvest", str(lm / "hf"), str(tokens), str(acts), "--site", SITE,
                     "--max-contexts", str(n_contexts - 64)]) == 0
    # The README's command; length, batch and logging changed for a test's time.
    assert cli.main(["train", "--quiet", "data.source=store", f"data.store_path={acts}",
                     "sae.d_in=128", "sae.n_features=512", "train.steps=800",
                     "train.batch_size=256", f"train.run_dir={sae}", "train.progress=false",
                     "train.log_every=400", "train.checkpoint_every=800"]) == 0
    out = tmp_path / "eval"
    capsys.readouterr()
    assert cli.main(["eval", str(sae), "--tokens", str(tokens), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    row = result["saes"][0]
    assert f"{n_contexts - 64}:" in result["contexts"], (result["contexts"], printed)
    assert row["loss_recovered_zero"] > 0.5, row
    assert row["l0"] < 40, row
