"""Run directories do not depend on the directory a command ran in: data paths are recorded
absolute, and a run moved together with its data finds it again (eval and export from a third
directory). `eval`/`analyze` default to contexts the SAE was not trained on, when the run records
which ones it was (a store harvested with --holdout), and say which they used."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from saejax import cli
from saejax.config import load_config, save_config
from saejax.eval.run import default_contexts
from saejax.text.tokens import TokenDataset

SITE = "blocks.0.mlp.hook_post"


def test_run_moved_with_its_data_works_from_any_directory(tiny_world, tmp_path, monkeypatch,
                                                          capsys):
    a = tmp_path / "a"
    shutil.copytree(tiny_world.tokens, a / "data" / "tokens")
    shutil.copytree(tiny_world.lm, a / "lm")
    monkeypatch.chdir(a)  # every path the commands are given is relative to a
    n = len(TokenDataset("data/tokens"))
    assert cli.main(["harvest", "lm", "data/tokens", "data/acts", "--site", SITE,
                     "--holdout", "40"]) == 0
    assert cli.main(["train", "--quiet", "data.source=store", "data.store_path=data/acts",
                     "sae.d_in=64", "sae.n_features=64", "train.steps=10",
                     "train.batch_size=64", "train.log_every=5", "train.progress=false",
                     "train.run_dir=runs/sae"]) == 0
    saved = yaml.safe_load((a / "runs" / "sae" / "config.yaml").read_text())
    assert saved["data"]["store_path"] == str(a / "data" / "acts")
    assert saved["train"]["run_dir"] == str(a / "runs" / "sae")

    b = tmp_path / "b"
    os.rename(a, b)  # the run and its data move together
    (tmp_path / "c").mkdir()
    monkeypatch.chdir(tmp_path / "c")
    capsys.readouterr()
    assert cli.main(["eval", str(b / "runs" / "sae"), "--tokens", str(b / "data" / "tokens"),
                     "--out", "ev"]) == 0
    held_out = f"{n - 40}:{n}"
    out = capsys.readouterr().out
    assert out.startswith(f"contexts {held_out} (held out: the SAEs were trained on contexts "
                          f"0:{n - 40} of "), out
    ev = json.loads(Path("ev/eval.json").read_text())
    assert ev["contexts"] == held_out and ev["lm_path"] == str(b / "lm")
    assert ev["n_contexts"] == 40

    assert cli.main(["export", str(b / "runs" / "sae"), "exported"]) == 0
    meta = json.loads(Path("exported/cfg.json").read_text())["metadata"]
    assert meta["dataset_path"] == str(b / "data" / "acts") and meta["model_name"] == str(b / "lm")
    # the export knows its store too, so its default is the same held-out range
    assert default_contexts(["exported"], b / "data" / "tokens", "-2000:")[0] == held_out

    # the same command, run where the project now is, finds the run finished (and, with more
    # steps where nothing depends on the length, would resume it): the moved paths match
    monkeypatch.chdir(b)
    capsys.readouterr()
    assert cli.main(["train", "data.source=store", "data.store_path=data/acts",
                     "sae.d_in=64", "sae.n_features=64", "train.steps=10",
                     "train.batch_size=64", "train.log_every=5", "train.progress=false",
                     "train.run_dir=runs/sae"]) == 0
    assert "run already complete at step 10" in capsys.readouterr().out


def fake_run(root: Path, name: str, *overrides: str) -> Path:
    """A run directory holding only config.yaml: all that `default_contexts` reads."""
    run = root / name
    run.mkdir()
    save_config(load_config(None, list(overrides)), run / "config.yaml")
    return run


@pytest.mark.parametrize("overrides, contexts, why", [
    (["data.source=synthetic"], "-2000:", "not trained on"),
    (["data.source=npy", "data.paths=[x.npy]"], "-2000:", "not recorded"),
    (["data.source=store", "data.store_path=STORE"], "-2000:", "overlap their training data"),
    (["data.source=lm", "data.lm_path=LM", "data.tokens_path=TOKENS", f"data.site={SITE}",
      "train.batch_size=64", "data.buffer_size=4096", "data.buffer_blocks=4",
      "data.lm_batch_contexts=8"], "-2000:", "overlap their training data"),
])
def test_default_contexts_say_what_they_know(tiny_world, tmp_path, overrides, contexts, why):
    names = {"STORE": tiny_world.store, "LM": tiny_world.lm, "TOKENS": tiny_world.tokens}
    overrides = [o.split("=")[0] + "=" + str(names.get(o.split("=")[1], o.split("=")[1]))
                 for o in overrides]
    run = fake_run(tmp_path, "run", *overrides)
    got, reason = default_contexts([run], tiny_world.tokens, "-2000:")
    assert got == contexts and why in reason, reason


def test_default_contexts_of_another_dataset(tiny_world, tmp_path):
    """Trained on a store of another token dataset: every context of this one is held out."""
    from saejax.text.tokenizer import load_tokenizer
    from saejax.text.tokens import write_token_dataset
    from tiny_world import documents

    other = write_token_dataset(documents(60)[::-1], load_tokenizer(tiny_world.tokenizer),
                                tmp_path / "other", ctx_len=16)
    run = fake_run(tmp_path, "run", "data.source=store", f"data.store_path={tiny_world.store}")
    assert default_contexts([run], other.path, "0:2000") == (
        "0:2000", f"held out: the SAEs were not trained on {other.path}")


def test_resolve_data_path(tmp_path):
    from saejax.files import resolve_data_path

    (tmp_path / "new" / "data").mkdir(parents=True)
    (tmp_path / "new" / "data" / "a.npy").write_bytes(b"")
    run, old = tmp_path / "new" / "runs" / "r", tmp_path / "old"
    here = str(tmp_path / "new" / "data" / "a.npy")
    assert resolve_data_path(here, str(old / "runs" / "r"), run) == here  # exists: as recorded
    # moved with the run: the same place relative to it (a file, a glob, a directory)
    assert resolve_data_path(str(old / "data" / "a.npy"), str(old / "runs" / "r"), run) == here
    assert resolve_data_path(str(old / "data" / "*.npy"), str(old / "runs" / "r"), run) == \
        str(tmp_path / "new" / "data" / "*.npy")
    # an older run recorded both relative to where it ran: the same rule applies
    assert resolve_data_path("data", "runs/r", run) == str(tmp_path / "new" / "data")
    # not found anywhere, or a hub id: unchanged, so the error names what was recorded
    assert resolve_data_path(str(old / "gone"), str(old / "runs" / "r"), run) == str(old / "gone")
    assert resolve_data_path("gpt2", str(old / "runs" / "r"), run) == "gpt2"
    assert resolve_data_path("", str(old), run) == ""
