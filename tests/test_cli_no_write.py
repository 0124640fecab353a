"""A refused command writes nothing: a rejected `saejax train` (bad store path, d_in that does not
match the data) or `saejax tokenize` (an existing dataset, inconsistent options, missing text)
leaves the directory byte for byte as it was, so the corrected command then just works; and
`tokenize --overwrite` swaps the new dataset and tokenizer in whole, leaving the old ones intact
when it fails or is interrupted on the way."""

import os
from pathlib import Path

import numpy as np
import pytest

from saejax import cli
from saejax.data.store_writer import harvest_to_store
from saejax.text.tokens import TokenDataset

D = 16


def snapshot(root: Path) -> dict:
    """Every directory and file under root (hidden ones too), files with their bytes and
    modification time: equal snapshots mean nothing was written, renamed or left behind."""
    out = {}
    for dirpath, _, files in os.walk(root):
        out[os.path.relpath(dirpath, root)] = None
        for name in files:
            path = Path(dirpath) / name
            out[os.path.relpath(path, root)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("saejax: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and needle in err, err
    return err


@pytest.fixture
def store(tmp_path) -> Path:
    """A tiny activation store of width D (fake activations: only its shape matters here)."""
    rng = np.random.default_rng(0)
    contexts = rng.integers(1, 9, size=(16, 8))
    harvest_to_store(contexts, lambda t: {"site": rng.normal(size=(*t.shape, D))},
                     tmp_path / "acts", sites=["site"], contexts_per_shard=8, batch_contexts=8,
                     drop_bos=False)
    return tmp_path / "acts"


def train_args(store: Path, run_dir: Path, d_in: int = D) -> list[str]:
    return ["train", "--quiet", "data.source=store", f"data.store_path={store}",
            f"sae.d_in={d_in}", "sae.n_features=32", "train.steps=4", "train.batch_size=32",
            "train.log_every=2", "train.checkpoint_every=4", "train.progress=false",
            f"train.run_dir={run_dir}"]


def test_rejected_train_writes_nothing_and_the_corrected_command_runs(store, tmp_path, capsys):
    run = tmp_path / "runs" / "sae"
    before = snapshot(tmp_path)
    assert cli.main(train_args(tmp_path / "no_store", run)) == 2
    one_line_error(capsys, "no_store")
    assert cli.main(train_args(store, run, d_in=D + 1)) == 2
    one_line_error(capsys, f"width {D} but sae.d_in={D + 1}")
    assert snapshot(tmp_path) == before  # no run directory, no config.yaml
    assert cli.main(train_args(store, run)) == 0  # the corrected command is not refused

    # A finished run is not touched by a rejected command either.
    before = snapshot(tmp_path)
    assert cli.main(train_args(store, run, d_in=D + 1)) == 2
    one_line_error(capsys, "config error")
    assert snapshot(tmp_path) == before


TEXT = "\n\n".join(f"note {i}: the cat sat on mat {i % 5} and the dog ran {i % 3}."
                   for i in range(200))


def tokenize(tmp_path: Path, *extra: str) -> int:
    return cli.main(["tokenize", str(tmp_path / "tokens"), "--text", str(tmp_path / "c.txt"),
                     "--separator", "", "--ctx-len", "16", *extra])


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A complete token dataset (and its trained BPE in tokens-tokenizer) to refuse or replace."""
    (tmp_path / "c.txt").write_text(TEXT)
    assert tokenize(tmp_path, "--train-bpe", "300") == 0
    return tmp_path / "tokens"


@pytest.mark.parametrize("extra, needle", [
    (["--train-bpe", "280"], "pass --overwrite to replace it"),  # retrains nothing first
    (["--tokenizer", "TOKENIZER"], "already holds a complete token dataset"),
    (["--train-bpe", "280", "--tokenizer", "TOKENIZER"], "exactly one of"),
    (["--tokenizer", "TOKENIZER", "--tokenizer-out", "x"], "--tokenizer-out"),
    (["--train-bpe", "200", "--overwrite"], "more than 256 tokens"),
    (["--train-bpe", "280", "--overwrite", "--ctx-len", "1"], "ctx_len"),
    (["--train-bpe", "280", "--overwrite", "--max-contexts", "0"], "--max-contexts"),
    (["--train-bpe", "280", "--overwrite", "--text", "missing/*.txt"], "matches no files"),
    (["--train-bpe", "280", "--overwrite", "--tokenizer-out", "FOREIGN"], "not a tokenizer"),
    (["--train-bpe", "280", "--overwrite", "--tokenizer-out", "TOKENS/tok"], "contain each"),
])
def test_rejected_tokenize_writes_nothing(dataset, tmp_path, capsys, extra, needle):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    names = {"TOKENIZER": str(tmp_path / "tokens-tokenizer"), "FOREIGN": str(tmp_path / "foreign"),
             "TOKENS/tok": str(dataset / "tok")}
    extra = [names.get(a, a) for a in extra]
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert tokenize(tmp_path, *extra) == 2
    err = one_line_error(capsys, needle)
    assert "overwrite=True" not in err  # a flag, not a Python argument
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt, 130), (ValueError("disk trouble"), 2)])
def test_overwrite_that_fails_leaves_the_old_dataset_whole(dataset, tmp_path, monkeypatch, stop,
                                                           code):
    import saejax.text.tokens as tokens_mod

    calls = []

    def failing(tokenizer, texts):  # packing fails once the new BPE has been trained
        calls.append(len(tokenizer))
        raise stop

    monkeypatch.setattr(tokens_mod, "encode_batch", failing)
    before = snapshot(tmp_path)
    assert tokenize(tmp_path, "--train-bpe", "280", "--overwrite") == code
    assert calls == [280] and snapshot(tmp_path) == before  # old dataset and tokenizer whole,
    # no temporary directory left


def test_overwrite_replaces_dataset_and_tokenizer_together(dataset, tmp_path, capsys):
    assert tokenize(tmp_path, "--train-bpe", "280", "--overwrite") == 0
    ds = TokenDataset(dataset)
    ds.verify()
    tok_dir = tmp_path / "tokens-tokenizer"
    assert ds.vocab_size == 280 and ds.manifest["tokenizer"]["name_or_path"] == str(tok_dir)
    from saejax.text.tokenizer import load_tokenizer

    assert len(load_tokenizer(tok_dir)) == 280
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "tokens", "tokens-tokenizer"]
    assert "trained a 280-token byte-level BPE" in capsys.readouterr().out
