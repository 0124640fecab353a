"""Bad input never gives a traceback or loses data: one table of bad invocations of the CLI.

Each row runs `saejax.cli.main(argv)` in this process and must exit non-zero within seconds with
exactly one line on stderr (no traceback) that matches the row's regex. Rows that start from a
good run (a copy of one trained once for the module) must leave every checkpoint as it was and
the newest one restorable; rows that start from nothing must write nothing when they fail
before compute.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import typing
import warnings
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pytest

from saejax import cli
from saejax.config import RANGES, Config
from saejax.runs import load_params
from saejax.typedconfig import in_range

from fs_faults import file_size_limit

# A damaged checkpoint's abandoned Orbax reads surface as unraisable/never-awaited noise at some
# later garbage collection (see tests/test_checkpoint.py).
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]

SMALL = ["sae.n_features=64", "sae.d_in=16", "data.n_true_features=32", "train.batch_size=64",
         "train.progress=false"]
GOOD = [*SMALL, "train.steps=8", "train.checkpoint_every=2", "train.log_every=2",
        "train.keep_checkpoints=10", "resample.enabled=false", "optim.decay=constant"]
"""The good run: checkpoints at steps 2, 4, 6, 8."""
SECONDS = 60  # per row; a refusal before compute takes well under one on an idle machine


@dataclass
class Paths:
    tmp: Path
    """This row's own empty directory."""
    run: Path
    """The row's run directory (a copy of the template when the row has one)."""
    data: Path
    """The module's data files (`data_files`)."""


@dataclass
class Row:
    id: str
    argv: Callable[[Paths], list[str]]
    match: str
    """A regex the stderr line must contain."""
    template: str | None = None
    """Start from a copy of this run: "good" (finished) or "cut" (killed after step 4)."""
    damage: Callable[[Path], None] | None = None
    """Applied to the copied run before the command (what it damages is not checked)."""
    after: Callable[[Paths], None] | None = None
    """Extra checks once the command has failed."""
    fault: Callable[[], contextlib.AbstractContextManager] | None = None
    """Context the command runs in (a file-system fault)."""
    restorable: bool = True
    """Whether the run still has a checkpoint that restores (false when all are damaged)."""
    newest_good: int | None = None
    """The step that restores (default: the newest)."""


def train(*overrides: str) -> Callable[[Paths], list[str]]:
    """`saejax train` of the small run with these overrides, in the row's run directory."""
    return lambda p: ["train", "--quiet", *SMALL, *overrides, f"train.run_dir={p.run}"]


def resume(*overrides: str) -> Callable[[Paths], list[str]]:
    """The good run's own command (plus overrides), in the row's run directory."""
    return lambda p: ["train", "--quiet", *GOOD, *overrides, f"train.run_dir={p.run}"]


def npy(*names: str) -> Callable[[Paths], list[str]]:
    """Train on these files of the module's data directory."""
    paths = lambda p: "[" + ", ".join(str(p.data / n) for n in names) + "]"  # noqa: E731
    return lambda p: ["train", "--quiet", *SMALL, "data.source=npy", f"data.paths={paths(p)}",
                      f"train.run_dir={p.run}"]


# ---------------------------------------------------------------- rows: keys, types, ranges


def _field_type(dotted: str) -> tuple[type, bool]:
    """(the field's type, or its items' for a list; whether it is a list)."""
    cls: typing.Any = Config
    for part in dotted.split("."):
        cls = typing.get_type_hints(cls)[part]
    is_list = typing.get_origin(cls) is list
    return (typing.get_args(cls)[0] if is_list else cls), is_list


def _violation(dotted: str) -> str:
    """An override value of the field's type that breaks its rule in RANGES."""
    tp, is_list = _field_type(dotted)
    candidates = [-1, 0, 2] if tp is int else [-1.0, 0.0, 1.5, 2.0]
    value = next(v for v in candidates if not in_range(float(v), RANGES[dotted]))
    return f"[{value}]" if is_list else str(value)


def _family(dotted: str) -> tuple[str, ...]:
    """The override choosing the family a `sae.<family>.` field belongs to."""
    parts = dotted.split(".")
    return (f"sae.arch={parts[1]}",) if parts[0] == "sae" and len(parts) == 3 else ()


def _float_fields(cls: type = Config, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if is_dataclass(tp):
            out += _float_fields(tp, f"{prefix}{f.name}.")
        elif tp is float:
            out.append(prefix + f.name)
    return out


RANGE_ROWS = [Row(f"range {name}", train(*_family(name), f"{name}={_violation(name)}"),
                  rf"{re.escape(name)}(\[0\])? must be ") for name in RANGES]
NONFINITE_ROWS = [Row(f"{v} {name}", train(*_family(name), f"{name}={v}"),
                      rf"{re.escape(name)} must be a finite number, got {v.lstrip('.-')}")
                  for name in _float_fields() for v in (".nan", ".inf")]

KEY_TYPE_ROWS = [
    Row("misspelled key", train("sae.n_featurs=64"), r"unknown config key sae\.n_featurs"),
    Row("misspelled section", train("trian.steps=4"), r"unknown config key trian"),
    Row("family field outside its section", train("sae.l1_coefficient=1e-3"),
        r"unknown config key sae\.l1_coefficient"),
    Row("other family's field", train("sae.arch=topk", "sae.topk.decoder_norm=unit"),
        r"unknown config key sae\.topk\.decoder_norm"),
    Row("unknown family", train("sae.arch=crosscoder"), r"crosscoder"),
    Row("key without value", train("train.steps"), r"expected key=value"),
    Row("override into a value", train("train.steps.x=1"), r"train\.steps|steps"),
    Row("int given text", train("train.steps=ten"), r"train\.steps: expected int"),
    Row("int given float", train("sae.n_features=64.5"), r"sae\.n_features: expected int"),
    Row("int given bool", train("train.batch_size=true"), r"train\.batch_size: expected int"),
    Row("float given text", train("optim.lr=fast"), r"optim\.lr: expected float"),
    Row("bool given int", train("train.tensorboard=2"), r"train\.tensorboard: expected bool"),
    Row("list given scalar", train("resample.steps=5"), r"resample\.steps: expected a list"),
    Row("list item of the wrong type", train("resample.steps=[1, x]"), r"resample\.steps\[1\]"),
    Row("literal out of choices", train("data.source=parquet"), r"data\.source: 'parquet'"),
    Row("section given a scalar", train("optim=3"), r"optim: expected a mapping"),
    Row("malformed override value", train("sae.n_features=[64"),
        r"override 'sae\.n_features=\[64'.*not valid YAML"),
    Row("int beyond int32", train("train.steps=99999999999"), r"train\.steps must be below 2"),
    Row("seed beyond int32", train("train.seed=4294967296"), r"train\.seed must be below 2"),
    Row("float overflowing to inf", train("optim.lr=1e999"),
        r"optim\.lr must be a finite number"),
    Row("mesh not dividing the features", train("mesh.model=3"), r"mesh\.model"),
    Row("mesh not matching the devices", train("mesh.data=3", "mesh.model=1"),
        r"must equal the 8 devices"),
    Row("batch not divisible over data", train("train.batch_size=60"),
        r"mesh\.data=8 does not divide train\.batch_size=60"),
    Row("topk k above the dictionary", train("sae.arch=topk", "sae.topk.k=65"), r"sae\.topk\.k"),
    Row("npy source without paths", train("data.source=npy"), r"data\.paths"),
    Row("store source without a path", train("data.source=store"), r"data\.store_path"),
    Row("lm source without a model", train("data.source=lm"), r"data\.lm_path"),
]

HUGE_ROWS = [
    Row("huge dictionary", train("sae.n_features=1073741824"),
        r"need about .* GiB per device .* but each of the 8 cpu devices has [\d.]+ GiB: lower "),
    Row("huge batch", train("train.batch_size=1073741824"), r"train\.batch_size=1073741824 need"),
    Row("huge input width", train("sae.d_in=16777216"),
        r"sae\.d_in=16777216, train\.batch_size=64 need about"),
    Row("huge width and dictionary", train("sae.d_in=4096", "sae.n_features=400000"),
        r"mesh\.model shards the dictionary"),
    Row("huge dictionary over the model axis", train("sae.n_features=1073741824", "mesh.model=8"),
        r"per device"),
    Row("huge synthetic ground truth", train("data.n_true_features=2000000000"),
        r"data\.n_true_features=2000000000 .* host memory"),
]

LM_ROWS = [Row(f"train-lm {o}", lambda p, o=o: ["train-lm", "--quiet", f"data.tokens={p.tmp}",
                                                 o, f"train.run_dir={p.run}"], m)
           for o, m in [("optim.b1=1", r"optim\.b1 must be in \[0, 1\)"),
                        ("optim.eps=-1", r"optim\.eps must be > 0"),
                        ("optim.lr=.nan", r"optim\.lr must be a finite number"),
                        ("model.layer_norm_epsilon=.inf", r"layer_norm_epsilon must be a finite"),
                        ("train.seed=-1", r"train\.seed must be >= 0"),
                        ("optim.min_lr_ratio=1.5", r"min_lr_ratio must be in \[0, 1\]"),
                        ("model.n_head=3", r"model\.n_head=3 must divide"),
                        ("model.n_layr=2", r"unknown config key model\.n_layr")]]


# ---------------------------------------------------------------- rows: files


def config_file(text: str | bytes) -> Callable[[Paths], list[str]]:
    """`train --config FILE` with FILE holding `text`."""
    def argv(p: Paths) -> list[str]:
        f = p.tmp / "my.yaml"
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", "--quiet", "--config", str(f), *SMALL, f"train.run_dir={p.run}"]
    return argv


YAML_ROWS = [
    Row("yaml unclosed list", config_file("sae:\n  n_features: [64\ntrain: {}\n"),
        r"my\.yaml is not valid YAML: line \d+, column \d+"),
    Row("yaml tab indent", config_file("sae:\n\tn_features: 64\n"), r"my\.yaml .*line 2"),
    Row("yaml unclosed flow map", config_file("optim: {lr: 1e-3\n"), r"my\.yaml .*line \d+"),
    Row("yaml bad indentation", config_file("sae:\n  d_in: 16\n n_features: 64\n"),
        r"my\.yaml is not valid YAML: line 3"),
    Row("yaml unclosed quote", config_file("train:\n  run_dir: 'runs/x\n"), r"my\.yaml .*line"),
    Row("yaml mapping in a scalar", config_file("a: b: c\n"),
        r"my\.yaml is not valid YAML: line 1"),
    Row("yaml top level a list", config_file("- sae\n- train\n"),
        r"my\.yaml: top level must be a mapping"),
    Row("yaml not UTF-8", config_file(b"sae:\n  d_in: \xff\xfe\n"), r"my\.yaml"),
    Row("yaml nan in a file", config_file("optim:\n  lr: .nan\n"),
        r"optim\.lr must be a finite number, got nan"),
    Row("yaml inf in a file", config_file("sae:\n  relu:\n    l1_coefficient: .inf\n"),
        r"sae\.relu\.l1_coefficient must be a finite number, got inf"),
    Row("yaml section null", config_file("optim:\n"), r"optim: expected a mapping"),
    Row("config file missing", lambda p: ["train", "--config", str(p.tmp / "none.yaml")],
        r"none\.yaml does not exist"),
    Row("config file a directory", lambda p: ["train", "--config", str(p.tmp)], r"is not a file"),
]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> Path:
    """.npy files, good and bad, and things that are not activation stores."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    good = rng.standard_normal((256, 16)).astype(np.float32)
    np.save(d / "good.npy", good)
    np.save(d / "w8.npy", good[:, :8])
    nan = good.copy()
    nan[::2, 3] = np.nan
    np.save(d / "nan.npy", nan)
    inf = good.copy()
    inf[1::2, 5] = np.inf
    np.save(d / "inf.npy", inf)
    (d / "empty.npy").write_bytes(b"")
    raw = (d / "good.npy").read_bytes()
    (d / "truncated.npy").write_bytes(raw[: len(raw) // 2])
    (d / "header_only.npy").write_bytes(raw[:100])
    (d / "text.npy").write_text("these are not activations\n")
    np.save(d / "1d.npy", good[:, 0])
    np.save(d / "3d.npy", good.reshape(16, 16, 16))
    np.save(d / "int.npy", np.arange(256 * 16, dtype=np.int32).reshape(256, 16))
    np.save(d / "bool.npy", good > 0)
    np.save(d / "complex.npy", good.astype(np.complex64))
    np.save(d / "object.npy", np.array([[None] * 16] * 4, dtype=object), allow_pickle=True)
    np.save(d / "zero_rows.npy", np.zeros((0, 16), np.float32))
    np.savez(d / "archive.npz", x=good)
    (d / "a_directory.npy").mkdir()
    (d / "empty_dir").mkdir()
    (d / "not_a_store").mkdir()
    (d / "not_a_store" / "manifest.json").write_text("{ not json")
    (d / "other_format").mkdir()
    (d / "other_format" / "manifest.json").write_text(json.dumps({"format": "x", "version": 1}))
    (d / "a_file").write_text("x")
    return d


def store(name: str) -> Callable[[Paths], list[str]]:
    return lambda p: ["train", "--quiet", *SMALL, "data.source=store",
                      f"data.store_path={p.data / name}", f"train.run_dir={p.run}"]


def no_run_dir(p: Paths) -> None:
    assert not p.run.exists(), f"{p.run} was written by a refused command"


DATA_ROWS = [
    Row("npy missing", npy("missing.npy"), r"missing\.npy"),
    Row("npy glob matching nothing", npy("nothing_*.npy"), r"nothing_\*\.npy"),
    Row("npy empty file", npy("empty.npy"), r"empty\.npy"),
    Row("npy truncated data", npy("truncated.npy"), r"truncated\.npy"),
    Row("npy header only", npy("header_only.npy"), r"header_only\.npy"),
    Row("npy not npy", npy("text.npy"), r"text\.npy"),
    Row("npy 1-D", npy("1d.npy"), r"1d\.npy: expected a 2-D"),
    Row("npy 3-D", npy("3d.npy"), r"3d\.npy: expected a 2-D"),
    Row("npy int", npy("int.npy"), r"int\.npy: expected a float array"),
    Row("npy bool", npy("bool.npy"), r"bool\.npy: expected a float array"),
    Row("npy complex", npy("complex.npy"), r"complex\.npy: expected a float array"),
    Row("npy pickled objects", npy("object.npy"), r"object\.npy"),
    Row("npy no rows", npy("zero_rows.npy"), r"hold no rows"),
    Row("npy archive", npy("archive.npz"), r"archive\.npz"),
    Row("npy a directory", npy("a_directory.npy"), r"a_directory\.npy"),
    Row("npy ragged widths", npy("good.npy", "w8.npy"), r"w8\.npy: shape \(256, 8\) has width 8"),
    Row("npy width not d_in", npy("w8.npy"), r"width 8 but sae\.d_in=16"),
    Row("npy NaN values", npy("nan.npy"), r"data\.source=npy: the data holds NaN or Inf"),
    Row("npy Inf values", npy("inf.npy"), r"data\.source=npy: the data holds NaN or Inf"),
    Row("store missing", store("no_such_store"), r"no_such_store"),
    Row("store an empty directory", store("empty_dir"), r"empty_dir is not an activation store"),
    Row("store a file", store("a_file"), r"a_file"),
    Row("store bad manifest", store("not_a_store"), r"manifest\.json: not valid JSON"),
    Row("store other format", store("other_format"), r"other_format.*format"),
]


# ---------------------------------------------------------------- rows: run directories


def steps_of(run: Path) -> dict[int, str]:
    """{step: sha256 of every file of its checkpoint directory}: committed steps only."""
    out = {}
    for d in (run / "checkpoints").iterdir() if (run / "checkpoints").is_dir() else []:
        if d.name.isdigit():
            h = hashlib.sha256()
            for f in sorted(p for p in d.rglob("*") if p.is_file()):
                h.update(str(f.relative_to(d)).encode() + f.read_bytes())
            out[int(d.name)] = h.hexdigest()
    return out


def _state_files(step_dir: Path) -> list[Path]:
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def truncate_all(run: Path) -> None:
    for step in steps_of(run):
        for f in _state_files(run / "checkpoints" / str(step)):
            os.truncate(f, f.stat().st_size // 2)


def delete_metas(run: Path) -> None:
    for step in steps_of(run):
        (run / "checkpoints" / str(step) / "meta" / "metadata").unlink()


def edit_metas(run: Path) -> None:
    for step in steps_of(run):
        f = run / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(f.read_text())
        meta["config"]["sae"]["relu"]["l1_coefficient"] = 1.0
        f.write_text(json.dumps(meta))


def delete_states(run: Path) -> None:
    for step in steps_of(run):
        shutil.rmtree(run / "checkpoints" / str(step) / "state")


def lose_config(run: Path) -> None:
    (run / "config.yaml").unlink()


def write_config(text: str) -> Callable[[Path], None]:
    return lambda run: (run / "config.yaml").write_text(text)


def still_no_config(p: Paths) -> None:
    assert not (p.run / "config.yaml").exists(), "config.yaml was written by a refused command"


@contextlib.contextmanager
def read_only(run: Path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop writes (the file-size rows cover it)")
    modes = {p: p.stat().st_mode for p in [run, *run.rglob("*")] if p.is_dir()}
    for p in modes:
        p.chmod(0o555)
    try:
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def a_file_as_run(p: Paths) -> list[str]:
    p.run = p.tmp / "run_file"
    p.run.write_text("not a directory")
    return train()(p)


def under_a_file(p: Paths) -> list[str]:
    (p.tmp / "plain").write_text("x")
    p.run = p.tmp / "plain" / "run"
    return train()(p)


RESUMED = r"last good checkpoint: step 4; rerun the same command to resume"

RUN_ROWS = [
    Row("run dir is a file", a_file_as_run, r"run_dir .*run_file is a file, not a directory"),
    Row("run dir under a file", under_a_file, r"Not a directory"),
    Row("run config.yaml malformed", resume(), r"config\.yaml.* line \d+", template="good",
        damage=write_config("sae: {n_features: 64\n")),
    Row("run config.yaml a list", resume(), r"config", template="good",
        damage=write_config("- 1\n- 2\n")),
    Row("run config.yaml empty", resume(), r"different config", template="good",
        damage=write_config("")),
    Row("run different lambda", resume("sae.relu.l1_coefficient=0.0123"),
        r"different config .*sae\.relu\.l1_coefficient", template="good"),
    Row("run different dictionary", resume("sae.n_features=128"),
        r"different config .*sae\.n_features: 64 -> 128", template="good"),
    Row("lost config.yaml, other lambda", resume("sae.relu.l1_coefficient=0.0123"),
        r"different config \(checkpoint step \d+: sae\.relu\.l1_coefficient", template="good",
        damage=lose_config, after=still_no_config),
    Row("lost config.yaml, other dictionary", resume("sae.n_features=128"),
        r"checkpoint step \d+: .*sae\.n_features: 64 -> 128", template="good",
        damage=lose_config, after=still_no_config),
    Row("lost config.yaml, other batch", resume("train.batch_size=128"),
        r"checkpoint step \d+: .*train\.batch_size", template="cut", damage=lose_config,
        after=still_no_config),
    Row("lost config.yaml, other data seed", resume("data.seed=1"),
        r"checkpoint step \d+: .*data\.seed", template="cut", damage=lose_config,
        after=still_no_config),
    Row("lost config.yaml, newest damaged, other lr", resume("optim.lr=0.0123"),
        r"checkpoint step \d+: .*optim\.lr", template="cut", newest_good=2,
        damage=lambda run: (lose_config(run), truncate_all_but(run, 2)), after=still_no_config),
    Row("all checkpoints truncated", resume(), r"no checkpoint in .* restores: step 4: .*step 2",
        template="cut", damage=truncate_all, restorable=False),
    Row("all checkpoint states deleted", resume(), r"no checkpoint in .* restores",
        template="cut", damage=delete_states, restorable=False),
    Row("all checkpoint metas deleted", resume(), r"no checkpoint in .* restores",
        template="cut", damage=delete_metas, restorable=False),
    Row("all checkpoint metas edited", resume(), r"no checkpoint .* fingerprint mismatch",
        template="cut", damage=edit_metas, restorable=False),
    Row("export, all checkpoints truncated",
        lambda p: ["export", str(p.run), str(p.tmp / "out")], r"no checkpoint .* restores",
        template="good", damage=truncate_all, restorable=False),
    Row("export, malformed config.yaml", lambda p: ["export", str(p.run), str(p.tmp / "out")],
        r"config\.yaml is not valid YAML: line \d+", template="good",
        damage=write_config("sae: [\n")),
    Row("export of a file", lambda p: ["export", str(p.data / "a_file"), str(p.tmp / "out")],
        r"a_file"),
    Row("export of nothing", lambda p: ["export", str(p.tmp / "nope"), str(p.tmp / "out")],
        r"nope"),
    Row("disk full while checkpointing", resume(), rf"File too large.*{RESUMED}",
        template="cut", fault=lambda: file_size_limit(12_000)),
    Row("disk full while writing config.yaml", resume(), rf"File too large.*{RESUMED}",
        template="cut", fault=lambda: file_size_limit(100)),
    Row("no room for a checkpoint", resume(),
        rf"cannot write a checkpoint in .*checkpoints: No space left on device \(a checkpoint "
        rf"needs about [\d.]+ MiB, 0.000954 MiB are free\); {RESUMED}", template="cut",
        fault=lambda: mock.patch("saejax.checkpoint.free_space", return_value=1000)),
]


def truncate_all_but(run: Path, keep: int) -> None:
    for step in steps_of(run):
        if step != keep:
            for f in _state_files(run / "checkpoints" / str(step)):
                os.truncate(f, f.stat().st_size // 2)


READ_ONLY_ROW = Row("read-only run dir", resume(), rf"{RESUMED}", template="cut")

FRESH_ROWS = (KEY_TYPE_ROWS + RANGE_ROWS + NONFINITE_ROWS + HUGE_ROWS + LM_ROWS + YAML_ROWS
              + DATA_ROWS)
"""Rows that start from nothing: all but the data's NaN/Inf (found in the first sample) are
refused before anything is written."""
for row in FRESH_ROWS:
    if "NaN" not in row.id and "Inf" not in row.id:
        row.after = no_run_dir
ROWS = FRESH_ROWS + RUN_ROWS + [READ_ONLY_ROW]


def test_table_has_at_least_100_rows():
    assert len(ROWS) >= 100 and len({r.id for r in ROWS}) == len(ROWS)


# ---------------------------------------------------------------- the good run


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """"good": a finished run with checkpoints at steps 2, 4, 6, 8; "cut": the same run as if
    killed after its step-4 checkpoint (later checkpoints and records gone)."""
    root = tmp_path_factory.mktemp("templates")
    good = root / "good"
    assert cli.main(["train", "--quiet", *GOOD, f"train.run_dir={good}"]) == 0
    assert sorted(steps_of(good)) == [2, 4, 6, 8]
    cut = root / "cut"
    shutil.copytree(good, cut)
    for step in (6, 8):
        shutil.rmtree(cut / "checkpoints" / str(step))
    records = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    (cut / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in records if r["step"] <= 4 and r.get("event") != "summary"))
    return {"good": good, "cut": cut}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_invocation(row: Row, templates, data_files, tmp_path, capsys):
    p = Paths(tmp=tmp_path, run=tmp_path / "run", data=data_files)
    if row.template:
        shutil.copytree(templates[row.template], p.run)
        if row.damage:
            row.damage(p.run)
    before = steps_of(p.run) if row.template else {}
    argv = row.argv(p)
    capsys.readouterr()
    fault = row.fault() if row.fault else (read_only(p.run) if row is READ_ONLY_ROW
                                           else contextlib.nullcontext())
    t0 = time.perf_counter()
    with fault:
        code = cli.main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err

    assert code != 0, f"exit 0 for {argv}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(row.match, lines[0]), lines[0]
    assert elapsed < SECONDS, f"{elapsed:.0f} s"
    if row.after:
        row.after(p)
    if row.template:
        assert steps_of(p.run) == before, "a checkpoint was changed, moved or deleted"
        if row.restorable:  # with the run's own config.yaml, which some rows damaged
            shutil.copy(templates[row.template] / "config.yaml", p.run / "config.yaml")
            with warnings.catch_warnings(record=True):  # of the damaged ones, if any
                assert load_params(p.run).step == (row.newest_good or max(before))


def test_memory_estimate_accepts_ordinary_runs():
    """The README's 4,096-feature run needs well under a laptop's memory on one device, and the
    estimate shrinks as the mesh axes spread the run (what the refusal tells the user to do)."""
    from saejax.config import load_config
    from saejax.train.loop import EVAL_ROWS
    from saejax.train.memory import device_bytes, peak
    from saejax.train.resample import CHUNK

    cfg = load_config(None, ["data.source=store", "data.store_path=acts", "sae.d_in=512",
                             "sae.n_features=4096"])
    one, spread = (peak(device_bytes(cfg, n, m, eval_rows=EVAL_ROWS, chunk_rows=CHUNK))
                   for n, m in [(1, 1), (2, 4)])
    assert one < 2 * 2**30 and spread < one / 3
