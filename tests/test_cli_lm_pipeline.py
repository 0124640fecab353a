"""The LM side through the command line, tiny and end to end: text -> BPE + token contexts
(`saejax tokenize`) -> one-layer LM (`saejax train-lm`) -> activations (`saejax harvest`) -> SAE
(`saejax train data.source=store`); and the errors a user meets on the way."""

import json

from saejax import cli

SITE = "blocks.0.mlp.hook_post"


def test_text_to_sae(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"note {i}: the cat sat on mat {i % 5} and the dog ran {i % 3}."
                                for i in range(300)))
    tokens, lm = tmp_path / "tokens", tmp_path / "lm"
    assert cli.main(["tokenize", str(tokens), "--text", str(text), "--separator", "",
                     "--train-bpe", "300", "--ctx-len", "16"]) == 0
    train_lm = ["train-lm", f"data.tokens={tokens}", f"train.run_dir={lm}",
                "model.n_embd=32", "model.n_head=4", "model.n_inner=64", "train.steps=30",
                "train.batch_size=16", "data.val_contexts=16", "train.log_every=10",
                "train.checkpoint_every=30", "train.eval_every=0",
                "optim.warmup_steps=5", "train.progress=false"]
    assert cli.main([*train_lm, "--quiet"]) == 0
    assert (lm / "hf" / "config.json").exists() and (lm / "hf" / "tokenizer.json").exists()
    capsys.readouterr()
    assert cli.main(train_lm) == 0  # run again: nothing to do, and it says so
    assert capsys.readouterr().out.startswith(f"run already complete at step 30 in {lm}\nstep 30")
    assert cli.main(["harvest", str(lm / "hf"), str(tokens), str(tmp_path / "acts"),
                     "--site", SITE, "--dtype", "bfloat16"]) == 0
    assert cli.main(["train", "--quiet", "data.source=store",
                     f"data.store_path={tmp_path / 'acts'}", "sae.d_in=64", "sae.n_features=128",
                     "train.steps=20", "train.batch_size=64", "train.log_every=10",
                     f"train.run_dir={tmp_path / 'sae'}", "train.progress=false"]) == 0
    summary = [json.loads(l) for l in (tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert summary[-1]["event"] == "summary" and summary[-1]["step"] == 20
    capsys.readouterr()

    # The errors: a site that does not exist lists the valid ones; a width that does not match.
    assert cli.main(["harvest", str(lm / "hf"), str(tokens), str(tmp_path / "x"),
                     "--site", "blocks.1.mlp.hook_post"]) == 2
    assert "valid sites: blocks.0.hook_resid_pre" in capsys.readouterr().err
    assert cli.main(["train", "--quiet", "data.source=store", "sae.d_in=128",
                     f"data.store_path={tmp_path / 'acts'}",
                     f"train.run_dir={tmp_path / 'sae2'}"]) == 2
    assert "width 64 but sae.d_in=128" in capsys.readouterr().err
    assert cli.main(["harvest", str(tmp_path / "no_lm"), str(tokens), str(tmp_path / "y"),
                     "--site", SITE]) == 2
    assert "no_lm" in capsys.readouterr().err
