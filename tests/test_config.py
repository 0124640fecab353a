import pytest

from saejax.config import Config, ConfigError, load_config, resample_steps, validate


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sae:\n  n_features: 1024\n  relu:\n    l1_coefficient: 1e-3\n"
                    "train:\n  steps: 10\n")
    cfg = load_config(path, ["sae.n_features=4096", "optim.lr=3e-4",
                             "resample.at_fractions=[0.25, 0.5]"])
    assert cfg.sae.n_features == 4096
    assert cfg.sae.relu.l1_coefficient == pytest.approx(1e-3)  # YAML "1e-3" is a string in YAML 1.1
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 10
    assert resample_steps(cfg) == [2, 5]


@pytest.mark.parametrize("override, field", [
    ("sae.n_featurez=3", "sae.n_featurez"),
    ("sae.n_features=abc", "sae.n_features"),
    ("sae.n_features=1.5", "sae.n_features"),
    ("sae.arch=crosscoder", "sae.arch"),
    ("sae.l1_coefficient=1e-3", "sae.l1_coefficient"),  # a family's field, outside its section
    ("sae.topk.k=abc", "sae.topk.k"),
    ("sae.relu.l1_coefficient=-1", "sae.relu.l1_coefficient"),
    ("train.progress=3", "train.progress"),
    ("resample.steps=[1, x]", "resample.steps[1]"),
    ("nosection.x=1", "nosection"),
    ("train.steps=0", "train.steps"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_impossible_mesh_combinations():
    cfg = Config()
    cfg.sae.n_features, cfg.mesh.model = 100, 8
    with pytest.raises(ConfigError, match=r"mesh.model=8 does not divide sae.n_features=100"):
        validate(cfg, n_devices=8)
    cfg = Config()
    cfg.train.batch_size, cfg.mesh.data, cfg.mesh.model = 100, 8, 1
    with pytest.raises(ConfigError, match=r"mesh.data=8 does not divide train.batch_size=100"):
        validate(cfg, n_devices=8)
    cfg = Config()
    cfg.mesh.data, cfg.mesh.model = 2, 2
    with pytest.raises(ConfigError, match="must equal the 8 devices"):
        validate(cfg, n_devices=8)


def test_topk_checks():
    with pytest.raises(ConfigError, match=r"sae.topk.k=600 must be in \[1, sae.n_features=512\]"):
        load_config(None, ["sae.arch=topk", "sae.topk.k=600", "sae.n_features=512"])
    with pytest.raises(ConfigError, match="unknown config key sae.topk.decoder_norm"):
        load_config(None, ["sae.arch=topk", "sae.topk.decoder_norm=l1_weighted"])
    # another family's section is checked only when that family is chosen
    load_config(None, ["sae.arch=relu", "sae.topk.k=600", "sae.n_features=512"])


def test_cli_reports_config_errors(capsys):
    from saejax.cli import main
    assert main(["train", "sae.bogus=1"]) == 2
    assert "sae.bogus" in capsys.readouterr().err


def test_readme_config_reference_is_current():
    """README's table is generated from the field docstrings; regenerate it when a field changes:
    paste the output of `python -c "from saejax.config import config_reference as r; print(r())"`
    (and of r(LMTrainConfig) for the train-lm table)."""
    from pathlib import Path
    from saejax.config import config_reference

    from saejax.train.lm import LMTrainConfig

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert config_reference() in readme
    assert config_reference(LMTrainConfig) in readme


def _numeric_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the int/float (and list of int/float) fields of a config dataclass."""
    import dataclasses
    import typing

    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float) or typing.get_args(tp) in ((int,), (float,)):
            out.append(prefix + f.name)
    return out


def test_every_numeric_field_has_a_range():
    """A new numeric field needs its rule in the table beside `validate` (NaN/Inf and values
    out of int32 are refused for every field anyway)."""
    from saejax.config import RANGES
    from saejax.train import lm

    assert sorted(set(_numeric_fields(Config)) - set(RANGES)) == []
    assert sorted(set(_numeric_fields(lm.LMTrainConfig)) - set(lm.RANGES)) == []
    assert sorted(set(RANGES) - set(_numeric_fields(Config))) == []  # no stale rule
    assert sorted(set(lm.RANGES) - set(_numeric_fields(lm.LMTrainConfig))) == []


@pytest.mark.parametrize("override, message", [
    ("optim.b1=1", r"optim.b1 must be in \[0, 1\), got 1.0"),
    ("optim.b2=-0.1", r"optim.b2 must be in \[0, 1\), got -0.1"),
    ("optim.eps=0", r"optim.eps must be > 0, got 0"),
    ("optim.lr=.nan", r"optim.lr must be a finite number, got nan"),
    ("optim.lr=.inf", r"optim.lr must be a finite number, got inf"),
    ("sae.relu.l1_coefficient=-.inf", r"sae.relu.l1_coefficient must be a finite number"),
    ("optim.grad_clip=-1", r"optim.grad_clip must be >= 0, got -1"),
    ("optim.warmup_steps=-5", r"optim.warmup_steps must be >= 0, got -5"),
    ("train.seed=-1", r"train.seed must be >= 0, got -1"),
    ("data.seed=4294967296", r"data.seed must be below 2\*\*31 in magnitude"),
    ("mesh.data=0", r"mesh.data must be -1 or >= 1, got 0"),
    ("resample.steps=[10, 0]", r"resample.steps\[1\] must be >= 1, got 0"),
    ("resample.at_fractions=[0.5, 1.0]", r"resample.at_fractions\[1\] must be in \(0, 1\)"),
    ("data.p_active=0", r"data.p_active must be in \(0, 1\], got 0"),
])
def test_ranges_and_finiteness(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_nan_and_inf_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .NaN\n")
    with pytest.raises(ConfigError, match="optim.lr must be a finite number, got nan"):
        load_config(path)
    path.write_text("sae:\n  relu:\n    l1_coefficient: .inf\n")
    with pytest.raises(ConfigError, match="sae.relu.l1_coefficient must be a finite number"):
        load_config(path)


def test_lm_ranges():
    from saejax.train.lm import load_lm_train_config, validate as validate_lm

    for override, message in [("optim.b1=1.5", r"optim.b1 must be in \[0, 1\)"),
                              ("optim.min_lr_ratio=2", r"optim.min_lr_ratio must be in \[0, 1\]"),
                              ("model.layer_norm_epsilon=.nan", "must be a finite number"),
                              ("train.seed=-3", "train.seed must be >= 0")]:
        cfg = load_lm_train_config(None, ["data.tokens=x", override])
        with pytest.raises(ConfigError, match=message):
            validate_lm(cfg)


@pytest.mark.parametrize("text, where", [
    ("sae:\n  n_features: [1, 2\ntrain: {}\n", "line 3"),
    ("sae:\n\tn_features: 4\n", "line 2"),
    ("optim: {lr: 1e-3\n", "line 2"),
])
def test_malformed_yaml_names_file_and_line(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"bad.yaml is not valid YAML: {where}, column \d+"):
        load_config(path)


def test_malformed_override_and_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'sae.n_features=\[': .* not valid YAML"):
        load_config(None, ["sae.n_features=["])
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)
