"""What the command line says: help that lists every config field with its default, help text on
every flag, --version, `saejax config --show`; one line `saejax: <kind>: <message>` (and its exit
code) for every error a user can cause, never a traceback; export's --overwrite; a finished run
run again says so."""

import argparse
import json

import pytest
import yaml

from saejax import cli
from saejax.config import Config, load_config
from saejax.errors import CheckpointError, ConfigError, NonFiniteLossError, StorageError
from saejax.typedconfig import flatten, to_dict

TINY = ["sae.d_in=16", "sae.n_features=32", "data.n_true_features=16", "train.steps=4",
        "train.batch_size=64", "train.log_every=2", "train.checkpoint_every=2",
        "train.progress=false"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("saejax: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


# ---------------------------------------------------------------- help


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("saejax ")


@pytest.mark.parametrize("command, root", [("train", "saejax.config:Config"),
                                           ("train-lm", "saejax.train.lm:LMTrainConfig")])
def test_trainer_help_lists_every_field_with_its_default(capsys, command, root):
    import importlib

    module, name = root.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    for field, default in flatten(to_dict(cls())).items():
        assert f"  {field}={default!r} " in out, field
    assert "Config reference" in out and "saejax config --show" in out


def test_every_flag_of_every_command_has_help():
    for name, parser in subcommands().items():
        assert parser.description, name
        for action in parser._actions:
            assert action.help, f"saejax {name} {action.option_strings or action.dest}"


def test_config_show_prints_the_effective_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text("sae:\n  n_features: 1024\n")
    assert cli.main(["config", "--show", "--config", "my.yaml", "optim.lr=1e-4",
                     "data.source=store", "data.store_path=acts"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    want = to_dict(load_config("my.yaml", ["optim.lr=1e-4", "data.source=store",
                                           "data.store_path=acts"]))
    want["data"]["store_path"] = str(tmp_path / "acts")  # recorded absolute, as train records it
    want["train"]["run_dir"] = str(tmp_path / "runs" / "default")
    assert shown == want and shown["sae"]["n_features"] == 1024
    assert cli.main(["config", "--show", "--lm", "model.n_layer=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["n_layer"] == 2
    assert cli.main(["config", "--show", "sae.n_featurez=3"]) == 2
    assert "sae.n_featurez" in one_line(capsys)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("error, line, code", [
    (ConfigError("sae.d_in must be positive"), "saejax: config error: sae.d_in must be positive", 2),
    (NonFiniteLossError("loss became NaN/Inf at step 3"), "saejax: training stopped: loss", 3),
    (CheckpointError("no checkpoint restores"), "saejax: checkpoint error: no checkpoint", 4),
    (StorageError("run dir is read-only"), "saejax: storage error: run dir is", 2),
    (FileNotFoundError(2, "No such file or directory", "x.npy"), "saejax: file error: [Errno 2]", 2),
    (PermissionError(13, "Permission denied", "out"), "saejax: file error: [Errno 13]", 2),
    (ValueError("first line\n  second line"), "saejax: error: first line second line", 2),
    (KeyError("d_in"), "saejax: error: d_in", 2),
    (yaml.YAMLError("mapping values are not allowed here"), "saejax: config error: mapping", 2),
])
def test_user_errors_are_one_line(monkeypatch, capsys, error, line, code):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_browse", fail)
    assert cli.main(["browse", "a", "b"]) == code
    assert one_line(capsys).startswith(line)


def test_interrupt_and_internal_errors(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_browse", interrupted)
    assert cli.main(["browse", "a", "b"]) == 130
    assert one_line(capsys) == "saejax: interrupted"

    def bug(args):
        raise RuntimeError("a bug keeps its traceback")

    monkeypatch.setattr(cli, "cmd_browse", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["browse", "a", "b"])


def test_malformed_yaml_config_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("sae:\n  n_features: [1, 2\n")
    assert cli.main(["train", "--config", str(tmp_path / "bad.yaml"),
                     f"train.run_dir={tmp_path / 'run'}"]) == 2
    assert "bad.yaml" in one_line(capsys) and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished synthetic run."""
    run_dir = tmp_path_factory.mktemp("messages") / "run"
    assert cli.main(["train", "--quiet", *TINY, f"train.run_dir={run_dir}"]) == 0
    return run_dir


def test_finished_run_says_so(run, capsys):
    capsys.readouterr()
    assert cli.main(["train", *TINY, f"train.run_dir={run}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"run already complete at step 4 in {run}"
    assert out[1].startswith("final (held-out): step 4") and len(out) == 2
    assert cli._interrupted_at(str(run)) == ("interrupted at step 4 (its last checkpoint); rerun "
                                             "the same command to resume")
    assert "before the first checkpoint" in cli._interrupted_at(str(run / "nothing"))


def test_export_overwrite_and_lm_runs(run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["export", str(run), str(out)]) == 2
    err = one_line(capsys)
    assert "exists and is not empty; pass --overwrite" in err and "overwrite=True" not in err
    assert (out / "notes.txt").read_text() == "mine"
    assert cli.main(["export", str(run), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert json.loads((out / "cfg.json").read_text())["d_sae"] == 32

    lm_run = tmp_path / "lm"
    lm_run.mkdir()
    (lm_run / "config.yaml").write_text("model:\n  n_layer: 1\ndata:\n  tokens: t\n")
    assert cli.main(["export", str(lm_run), str(tmp_path / "x")]) == 2
    assert "is a language-model run (train-lm), not an SAE run" in one_line(capsys)
    assert not (tmp_path / "x").exists()


def test_config_fields_are_the_dataclass_fields():
    """The help's listing comes from the same table as the README's reference."""
    rows = cli._reference_rows(Config)
    assert [r[0] for r in rows] == list(flatten(to_dict(Config())))
