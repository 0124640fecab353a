"""The evaluation and analysis commands end to end on the tiny world: eval -> analyze (with
script features and offline auto-interpretability) -> browse, and compare; plus their errors."""

import json

from saejax import cli


def test_eval_analyze_browse_compare(tiny_world, tmp_path, capsys):
    small, large = str(tiny_world.sae_small), str(tiny_world.sae_large)
    tokens = ["--tokens", str(tiny_world.tokens)]
    assert cli.main(["eval", small, str(tiny_world.sae_export), *tokens, "--contexts=-20:",
                     "--out", str(tmp_path / "eval")]) == 0
    ev = json.loads((tmp_path / "eval" / "eval.json").read_text())
    run, export = ev["saes"]
    assert run["loss"] == export["loss"] and run["l0"] == export["l0"]  # same SAE, two formats
    assert (tmp_path / "eval" / run["density_png"]).read_bytes()[:4] == b"\x89PNG"

    an = tmp_path / "analysis"
    assert cli.main(["analyze", small, *tokens, "--contexts", "0:40", "--out", str(an),
                     "--top-k", "5", "--samples", "5", "--scripts", "arabic",
                     "--autointerp", "offline", "--autointerp-n", "4"]) == 0
    index = json.loads((an / "analysis.json").read_text())
    assert len(index["features"]) == 64
    scored = [json.loads(p.read_text()) for p in (an / "features").glob("*.json")]
    assert sum(f["score"] is not None for f in scored) == 4
    assert json.loads((an / "scripts" / "scripts.json").read_text())
    assert cli.main(["browse", str(an), str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "index.html").is_file()

    assert cli.main(["compare", small, large, *tokens, "--contexts", "0:40",
                     "--out", str(tmp_path / "cmp")]) == 0
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (tmp_path / "cmp" / "splitting.png").is_file() and cmp
    out = capsys.readouterr().out
    assert "clean loss" in out and "autointerp: 4 features scored" in out


def test_analysis_commands_name_bad_inputs(tiny_world, tmp_path, capsys):
    tokens = ["--tokens", str(tiny_world.tokens)]
    assert cli.main(["eval", str(tmp_path / "nope"), *tokens]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["analyze", str(tiny_world.sae_small), *tokens, "--contexts", "x",
                     "--out", str(tmp_path / "a")]) == 2
    assert "START:STOP" in capsys.readouterr().err
    assert cli.main(["browse", str(tmp_path / "no_analysis"), str(tmp_path / "site")]) == 2
    assert "no_analysis" in capsys.readouterr().err
    assert cli.main(["compare", str(tiny_world.sae_small), *tokens,
                     "--out", str(tmp_path / "c")]) == 2
