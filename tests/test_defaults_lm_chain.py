"""The README's LM chain through the command line on a tiny world (text -> BPE + token contexts
-> one-layer LM -> activations -> SAE -> eval), with the SAE defaults: the SAE must beat ablating
the layer by a clear margin (the defaults are part of the product). Only the run's length and
batch size are set, for time. Then the errors a user meets on the way, on the same chain."""

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
    train_lm = ["train-lm", f"data.tokens={tokens}", f"train.run_dir={lm}",
                "model.n_embd=32", "model.n_head=4", "model.n_inner=128", "train.steps=150",
                "train.batch_size=32", "data.val_contexts=32", "train.log_every=50",
                "train.checkpoint_every=150", "train.eval_every=0", "optim.warmup_steps=10",
                "train.progress=false"]
    assert cli.main([*train_lm, "--quiet"]) == 0
    assert (lm / "hf" / "config.json").exists() and (lm / "hf" / "tokenizer.json").exists()
    capsys.readouterr()
    assert cli.main(train_lm) == 0  # run again: nothing to do, and it says so
    assert capsys.readouterr().out.startswith(f"run already complete at step 150 in {lm}\n")
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

    # The errors: a site that does not exist lists the valid ones; a width that does not match;
    # a model directory that does not exist.
    assert cli.main(["harvest", str(lm / "hf"), str(tokens), str(tmp_path / "x"),
                     "--site", "blocks.1.mlp.hook_post"]) == 2
    assert "valid sites: blocks.0.hook_resid_pre" in capsys.readouterr().err
    assert cli.main(["train", "--quiet", "data.source=store", "sae.d_in=64",
                     f"data.store_path={acts}", f"train.run_dir={tmp_path / 'sae2'}"]) == 2
    assert "width 128 but sae.d_in=64" in capsys.readouterr().err
    assert cli.main(["harvest", str(tmp_path / "no_lm"), str(tokens), str(tmp_path / "y"),
                     "--site", SITE]) == 2
    assert "no_lm" in capsys.readouterr().err
