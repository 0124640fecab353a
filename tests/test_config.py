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
    ("sae.arch=gated", "sae.arch"),
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
