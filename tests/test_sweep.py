"""Sweeps (saejax/sweep.py, StepContract's member axis, the loop's groups): members named and
validated before any compute, one compiled step per group whose members equal their solo runs
on every mesh, a NaN member frozen while the others go on, exact resume after SIGKILL, and
per-member export, metrics and TensorBoard runs."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from saejax import cli
from saejax.checkpoint import Checkpointer
from saejax.config import Config, ConfigError, MeshConfig, load_config
from saejax.data import with_absolute_paths
from saejax.errors import NonFiniteLossError, Preempted
from saejax.eval.trained import load_sae
from saejax.export import load_saelens
from saejax.sae import FAMILIES, get_family
from saejax.sharding import make_mesh
from saejax.sweep import data_fields, load_sweep, map_configs
from saejax.train.loop import build_parts, summarize, train
from saejax.train.resample import resample
from saejax.train.state import init_state, make_optimizer
from saejax.train.step import StepContract, train_step
from saejax.typedconfig import flatten, load_dataclass, to_dict
from test_train_e2e import KILLED_RUN, Run, _env, assert_states_bitwise_equal

TINY = ["sae.d_in=16", "sae.n_features=64", "data.n_true_features=32", "train.batch_size=64",
        "train.progress=false", "resample.n_inputs=512"]


# ---------------------------------------------------------------- members and groups


def test_members_are_crossed_named_as_written_and_grouped(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({
        "sae": {"arch": "topk"},
        "sweep": {"grid": {"sae.topk.aux_coefficient": ["1e-2", 0.5]},
                  "members": [{"sae.n_features": 128}, {"sae.n_features": 256}]}}))
    sweep = load_sweep(path, ["sae.d_in=32"], ["train.seed=[0,1]"])
    names = [m.name for m in sweep.members]
    assert names[0] == "n_features=128,aux_coefficient=1e-2,seed=0"
    assert len(names) == 8 and len(set(names)) == 8
    # n_features changes shapes: two groups; the AuxK weight and the seed are data inside them.
    assert [[m.cfg.sae.n_features for m in g.members] for g in sweep.groups] == [[128] * 4,
                                                                                [256] * 4]
    m = sweep.member("n_features=256,aux_coefficient=0.5,seed=1")
    assert (m.cfg.sae.topk.aux_coefficient, m.cfg.train.seed, m.cfg.sae.d_in) == (0.5, 1, 32)
    # Two fields ending alike are named in full.
    both = load_sweep(None, [], ["sae.relu.target_l0=[4,8]", "sae.gated.target_l0=[2]"])
    assert both.members[0].name == "sae.relu.target_l0=4,sae.gated.target_l0=2"
    # k is data up to the group's largest k; the nested widths are shapes (lists of lists kept
    # whole in names).
    ks = load_sweep(None, ["sae.arch=matryoshka", "sae.n_features=64"],
                    ["sae.topk.k=[4,8]", "sae.matryoshka.widths=[[16,64],[32,64]]"])
    assert ks.members[1].name == "k=4,widths=[32,64]" and len(ks.groups) == 2
    assert [g.cfg.sae.topk.k for g in ks.groups] == [8, 8]
    assert load_sweep(None, ["sae.n_features=64"], []) is None


@pytest.mark.parametrize("sweep_args, message", [
    (["sae.topk.k=[4,1000]"], r"sweep member k=1000: sae.topk.k=1000 must be in \[1"),
    (["data.seed=[0,1]"], "data.seed cannot vary within a sweep"),
    (["optim.lr=[1e-3,-1]"], "sweep member lr=-1: optim.lr"),
    (["optim.lr=1e-3"], "expected a list"),
    (["train.seed=[0,1]", "mesh.sae=[2]"], "mesh.sae cannot vary"),
])
def test_bad_members_are_refused_before_anything_is_written(tmp_path, capsys, sweep_args,
                                                            message):
    run_dir = tmp_path / "run"
    argv = ["train", "sae.arch=topk", *TINY, f"train.run_dir={run_dir}"]
    for arg in sweep_args:
        argv += ["--sweep", arg]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(message, err), err
    assert not run_dir.exists()


def test_sae_axis_must_divide_every_group(tmp_path, capsys):
    argv = ["train", *TINY, "mesh.sae=2", f"train.run_dir={tmp_path / 'run'}",
            "--sweep", "optim.lr=[1e-3,2e-3,3e-3]"]
    assert cli.main(argv) == 2
    assert "mesh.sae=2 does not divide the 3 members" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    return value + 1 if isinstance(value, int) else value * 1.5 + 0.01


def _program(cfg: Config) -> str:
    tx = make_optimizer(cfg)
    state = jax.eval_shape(lambda: init_state(cfg, tx, None))
    step = partial(train_step, graphdef=get_family(cfg.sae.arch).graphdef(cfg.sae), cfg=cfg,
                   tx=tx)
    return str(jax.make_jaxpr(step)(state, jax.ShapeDtypeStruct((8, cfg.sae.d_in), "float32")))


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_data_fields_leave_the_compiled_program_unchanged(arch):
    """Every field a sweep carries as data (DATA_FIELDS and the family's) changed at once: the
    step's program (jaxpr) is the same, only the state's values differ. A field read as a
    compiled constant would change it."""
    base = ["sae.d_in=8", "sae.n_features=32", f"sae.arch={arch}", "sae.topk.k=4",
            "optim.grad_clip=1"]
    cfg = load_dataclass(Config, None, base)
    flat = flatten(to_dict(cfg))
    fields = sorted(data_fields(cfg))
    changed = load_dataclass(Config, None, base + [f"{f}={json.dumps(_perturbed(flat[f]))}"
                                                   for f in fields])
    assert all(flatten(to_dict(changed))[f] != flat[f] for f in fields)
    assert _program(changed) == _program(cfg), fields


# ---------------------------------------------------------------- members equal solo runs


class _NoTruth:
    """A data provider without ground-truth metrics (for `summarize`)."""

    def summary_metrics(self, w_dec):
        return {}


def assert_close_params(got: dict, want: dict) -> None:
    """Equal to float32 rounding of sums taken in another order (other meshes): each
    parameter within 2e-5 of its largest entry (as tests/test_step_sharding.py)."""
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=0, atol=2e-5 * np.abs(w).max(), err_msg=k)


def _steps(contract, state, batches, resample_at, chunks):
    n = None
    for i, x in enumerate(batches):
        state, _ = contract.step_fn(state, jax.device_put(x, contract.batch_sharding))
        if i + 1 == resample_at:
            state, n = resample(contract, state,
                                (jax.device_put(c, contract.batch_sharding) for c in chunks))
    return state, n


def _group_and_data():
    """One group of 8 members (lr, seed and input scaling crossed) and its data: inputs in one
    quadrant of a plane, so features pointing away from it never fire and are resampled."""
    sweep = load_sweep(None, [*TINY, "sae.relu.l1_coefficient=3", "sae.relu.target_l0=0",
                              "resample.window_steps=3", "train.steps=12"],
                       ["optim.lr=[3e-3,3e-2]", "train.seed=[0,1]",
                        "sae.scale_inputs=[true,false]"])
    rng = np.random.default_rng(0)
    plane = lambda *shape: np.pad(np.abs(rng.standard_normal((*shape, 2))),
                                  [(0, 0)] * len(shape) + [(0, 14)]).astype(np.float32)
    return sweep.groups[0], (plane(256), plane(12, 64), plane(2, 64))


SOLO = (7,)  # differs from the member the step is compiled for in lr, seed and scaling


@pytest.fixture(scope="module")
def solo_runs():
    """Members SOLO trained alone on one device: {i: (state on host, number resampled)}."""
    group, (sample, batches, chunks) = _group_and_data()
    one = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    out = {}
    for i in SOLO:
        solo = StepContract.build(group.members[i].cfg, one)
        state, n = _steps(solo, solo.init(sample), batches, 8, chunks)
        out[i] = jax.device_get(state), int(n)
    return out


@pytest.mark.parametrize("shape", [pytest.param((1, 1, 1), marks=pytest.mark.slow),
                                   pytest.param((2, 1, 1), marks=pytest.mark.slow),
                                   pytest.param((2, 2, 1), marks=pytest.mark.slow), (2, 2, 2)])
def test_members_equal_their_solo_runs_on_every_mesh(shape, solo_runs):
    """lr, seed and input scaling vary inside one compiled step on (sae, data, model) meshes
    of 1-8 devices, through a resampling event; each member ends as its config trained alone on
    one device does (float32 rounding)."""
    sae, data, model = shape
    group, (sample, batches, chunks) = _group_and_data()
    mesh = make_mesh(MeshConfig(sae=sae, data=data, model=model),
                     jax.devices()[:sae * data * model])
    contract = StepContract.build(group.cfg, mesh, tuple(m.cfg for m in group.members))
    state, n = _steps(contract, contract.init(sample), batches, 8, chunks)
    assert n.shape == (8,) and n.sum() > 0  # the event did resample
    for i, (want, n_solo) in solo_runs.items():
        got = jax.device_get(contract.member_state(state, i))
        assert n_solo == n[i]
        assert_close_params(got.params, want.params)
        np.testing.assert_array_equal(got.last_fired, want.last_fired)


@pytest.mark.parametrize("arch, path", [pytest.param("topk", "dense", marks=pytest.mark.slow),
                                        ("topk", "sparse"), ("batchtopk", "dense")])
def test_k_varies_inside_one_step(arch, path):
    """Members k=2 and k=8 share the step compiled for k=8 (ranks ≥ 2 masked for the first),
    on a sae × data × model mesh; the k=2 member equals its solo run on those devices (a
    batch-wide top-k compared across meshes may flip a near-tie, a float32 rounding apart)."""
    sweep = load_sweep(None, [*TINY, f"sae.arch={arch}", f"sae.topk.path={path}",
                              "sae.topk.dead_tokens_aux=128", "train.steps=6"],
                       ["sae.topk.k=[2,8]"])
    (group,) = sweep.groups
    rng = np.random.default_rng(1)
    sample, batches = (rng.standard_normal(s).astype(np.float32) for s in ((256, 16),
                                                                            (6, 64, 16)))
    mesh = make_mesh(MeshConfig(sae=2, data=2, model=2))
    contract = StepContract.build(group.cfg, mesh, tuple(m.cfg for m in group.members))
    state, _ = _steps(contract, contract.init(sample), batches, 0, [])
    solo = StepContract.build(group.members[0].cfg, make_mesh(MeshConfig(data=4, model=2)))
    want, _ = _steps(solo, solo.init(sample), batches, 0, [])
    got = jax.device_get(contract.member_state(state, 0))
    assert_close_params(got.params, jax.device_get(want.params))
    np.testing.assert_array_equal(got.last_fired, jax.device_get(want.last_fired))
    other = jax.device_get(contract.member_state(state, 1))
    assert not np.allclose(other.params["W_enc"], got.params["W_enc"])  # k mattered
    if arch == "topk":  # the held-out summary encodes each member at its own k
        x = jax.device_put(sample, contract.batch_sharding)
        summary = summarize(group.members[0].cfg, contract, contract.member_state(state, 0),
                            _NoTruth(), x)
        assert summary["l0"] <= 2 + 1e-6


# ---------------------------------------------------------------- one sweep run, end to end

RUN_ARGS = [*TINY, "train.steps=24", "train.log_every=6", "train.checkpoint_every=6",
            "train.async_checkpointing=false", "train.tensorboard=true",
            "train.fail_on_frozen=true", "resample.window_steps=3", "optim.lr=0.01",
            "mesh.sae=2", "mesh.data=2", "mesh.model=2"]
SWEEP_ARGS = ["--sweep", "optim.lr=[1e-2,1e9]", "--sweep", "sae.n_features=[64,32]"]
FROZEN = ["lr=1e9,n_features=64", "lr=1e9,n_features=32"]


def _read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """Two shape groups (n_features 64 and 32) of two members each, one per group at an lr
    that drives its loss to NaN, on a sae=2 × data=2 × model=2 mesh, with resampling."""
    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    assert cli.main(["train", "--quiet", *RUN_ARGS, f"train.run_dir={run_dir}",
                     *SWEEP_ARGS]) == 3  # asked to fail at the end: two members froze
    return run_dir


def test_a_frozen_member_is_reported_and_the_others_equal_their_solo_runs(sweep_run, tmp_path):
    records = _read(sweep_run)
    frozen = [r for r in records if r.get("event") == "frozen"]
    assert sorted(r["member"] for r in frozen) == sorted(FROZEN)
    summaries = {r["member"]: r for r in records if r.get("event") == "summary"}
    assert set(summaries) == {"lr=1e-2,n_features=64", "lr=1e-2,n_features=32", *FROZEN}
    assert all("frozen_at" in summaries[m] for m in FROZEN)
    logged = {r["member"] for r in records if "loss" in r}
    assert logged == {"lr=1e-2,n_features=64", "lr=1e-2,n_features=32"}  # not after freezing
    assert any(r.get("n_resampled", 0) > 0 for r in records if r.get("event") == "resample")
    for name in ("lr=1e-2,n_features=32",):
        cfg = load_config(None, [*RUN_ARGS, "optim.lr=1e-2", "sae.n_features=32",
                                 f"train.run_dir={tmp_path / 'solo'}", "mesh.sae=1",
                                 "mesh.data=-1"])
        summary = train(cfg, quiet=True)
        for k in ("fvu", "l0", "mse", "dead_fraction", "mmcs"):
            np.testing.assert_allclose(summaries[name][k], summary[k], rtol=1e-5, err_msg=k)
        solo = load_sae(tmp_path / "solo")
        member = load_sae(f"{sweep_run}:{name}")
        for k, v in solo.params.items():
            np.testing.assert_allclose(member.params[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    runs = {p.name for p in (sweep_run / "tensorboard").iterdir() if p.is_dir()}
    assert runs == set(summaries)  # one TensorBoard run per member


def test_export_writes_one_saelens_folder_per_member(sweep_run, tmp_path):
    out = tmp_path / "exported"
    assert cli.main(["export", str(sweep_run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        yaml.safe_load((sweep_run / "sweep.yaml").read_text())["members"])
    params, cfg = load_saelens(out / "lr=1e-2,n_features=32")
    assert cfg["d_sae"] == 32
    member = load_sae(f"{sweep_run}:lr=1e-2,n_features=32")
    np.testing.assert_allclose(params["W_dec"], member.params["W_dec"], rtol=1e-6)
    assert cli.main(["export", str(sweep_run), str(tmp_path / "one"),
                     "--member", "lr=1e-2,n_features=64"]) == 0
    assert load_saelens(tmp_path / "one")[1]["d_sae"] == 64
    with pytest.raises(ConfigError, match="is a sweep of 4 members: name one"):
        load_sae(sweep_run)


# Slow: SIGTERM's save-and-resume is the default suite's in tests/test_preemption.py (one run);
# this adds a sweep's groups to it.
@pytest.mark.slow
def test_preempted_sweep_resumes_bitwise_exact(sweep_run, tmp_path, monkeypatch):
    """SIGTERM during a sweep (in this process: its handler sets a flag): the run saves the
    step it reached and raises Preempted; the same call resumes and ends bitwise equal to the
    uninterrupted sweep, metrics.jsonl included."""
    run_dir = tmp_path / "preempted"
    argv = [*RUN_ARGS, f"train.run_dir={run_dir}"]
    sweep = map_configs(load_sweep(None, argv, SWEEP_ARGS[1::2], 8), with_absolute_paths)
    save = Checkpointer.save

    def save_then_sigterm(self, step, state, meta):
        save(self, step, state, meta)
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Checkpointer, "save", save_then_sigterm)
    with pytest.raises(Preempted, match="saved step 1[2-5]"):
        train(sweep.base, quiet=True, sweep=sweep)
    monkeypatch.setattr(Checkpointer, "save", save)
    with pytest.raises(NonFiniteLossError, match="frozen"):  # train.fail_on_frozen
        train(sweep.base, quiet=True, sweep=sweep)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
    assert strip(_read(run_dir)) == strip(_read(sweep_run))
    assert_states_bitwise_equal(_restore(run_dir), _restore(sweep_run))


@pytest.mark.slow
def test_sigkill_and_resume_of_a_sweep_is_bitwise_exact(sweep_run, tmp_path):
    run_dir = tmp_path / "killed"
    argv = ["train", "--quiet", *RUN_ARGS, f"train.run_dir={run_dir}", *SWEEP_ARGS]
    killed = Run([sys.executable, "-c", KILLED_RUN, *argv],
                 {**_env(8), "SAEJAX_TEST_KILL_AT": "12"}, tmp_path / "killed.log")
    assert killed.wait() == -signal.SIGKILL, killed.output()
    resumed = Run([sys.executable, "-m", "saejax.cli", *argv], _env(8), tmp_path / "resumed.log")
    assert resumed.wait() == 3, resumed.output()
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
    assert strip(_read(run_dir)) == strip(_read(sweep_run))
    assert_states_bitwise_equal(_restore(run_dir), _restore(sweep_run))


def _restore(run_dir: Path) -> dict:
    """The newest checkpoint of a sweep run: {group: stacked TrainState} on the host."""
    sweep = load_sweep(None, [*RUN_ARGS, f"train.run_dir={run_dir}"], SWEEP_ARGS[1::2], 8)
    parts = build_parts(sweep.base, sweep, make_mesh(sweep.base.mesh))
    ck = Checkpointer(run_dir / "checkpoints", read_only=True)
    step, state, _ = ck.restore_latest({p.key: p.contract.abstract_state() for p in parts})
    assert step == 24
    return jax.device_get(state)
