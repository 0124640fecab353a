"""End-to-end runs of `saejax train`: SIGKILL + resume is bitwise exact, NaN/Inf stops cleanly,
ground-truth recovery, resampling revives dead features, multi-process equals single-process,
export matches the trained SAE, and config errors on the command line.

The CLI runs are real subprocesses on 4 fake CPU devices (mesh data=2 × model=2) or two
cooperating processes of 2 devices each (launch/local.py, jax.distributed over gloo). One
uninterrupted reference run is shared by the resume, multi-process and export tests; it and the
multi-process run start in the background when the first test needs one (`background` fixture).
The other runs are in-process (`train(cfg)` / `cli.main`) on the 8 devices of conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from saejax import cli
from saejax.checkpoint import Checkpointer
from saejax.config import Config, ConfigError, MeshConfig, from_dict, load_config, save_config
from saejax.data.npy import NpySource
from saejax.export import load_saelens
from saelens_numpy import saelens_decode, saelens_encode
from saejax.sharding import make_mesh
from saejax.train.loop import check_resumable, train
from saejax.train.step import StepContract

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for any one subprocess run (they take ~10-30 s)

# The shared CLI run: relu SAE, input scaling, async checkpoints every 10 steps, and two
# resampling events (steps 18 and 36) that do resample features (high lr and λ kill some).
REF_ARGS = [
    "sae.arch=relu", "sae.d_in=16", "sae.n_features=64", "sae.scale_inputs=true",
    "sae.relu.l1_coefficient=2", "sae.relu.target_l0=0", "optim.lr=0.01",
    "data.n_true_features=16", "data.p_active=0.05",
    "train.steps=60", "train.batch_size=64", "train.log_every=5", "train.checkpoint_every=10",
    "train.async_checkpointing=true", "train.keep_checkpoints=3", "train.progress=false",
    "resample.at_fractions=[0.3,0.6]", "resample.window_steps=5", "resample.n_inputs=1024",
    "mesh.data=2", "mesh.model=2",
]
REF_RESAMPLE_STEPS = [18, 36]
REF_LOG_STEPS = list(range(5, 61, 5))


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("SAEJAX_COORDINATOR", None)
    return env


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "saejax.cli", "train", "--quiet", *REF_ARGS, *extra,
            f"train.run_dir={run_dir}"]


def _multiprocess_run(run_dir: Path, log: Path, *extra: str) -> Run:
    return Run([sys.executable, str(REPO / "launch" / "local.py"), "--processes", "2",
                "--devices-per-process", "2", "--", "train", "--quiet", *REF_ARGS, *extra,
                f"train.run_dir={run_dir}"], _env(2), log)


class Run:
    """A subprocess (in its own process group) started now and waited for when its result is
    needed; output goes to `log`."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log = log
        with log.open("w") as fh:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the process and whatever it started (launch/local.py's workers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text()[-4000:]


# SIGKILLs itself right after save(KILL_AT) has started: the async write is still in flight
# and metrics.jsonl already holds log steps the resumed run will compute again.
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from saejax.checkpoint import Checkpointer

    KILL_AT = int(os.environ["SAEJAX_TEST_KILL_AT"])
    save = Checkpointer.save

    def save_then_die(self, step, state, meta):
        save(self, step, state, meta)
        if step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    Checkpointer.save = save_then_die
    from saejax.cli import main
    sys.exit(main(sys.argv[1:]))
""")
KILL_AT = 30


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e_runs")


@pytest.fixture(scope="module")
def background(runs_dir):
    """The module's two long CLI runs, started together in the background the first time a test
    needs either (on few cores they overlap each other and the tests in between):
    `ref`, the uninterrupted single-process run (4 devices) the others are compared with, and
    `mp`, the same config as two processes × 2 devices (launch/local.py)."""
    runs = {"ref": Run(_train_cmd(runs_dir / "ref"), _env(4), runs_dir / "ref.log"),
            "mp": _multiprocess_run(runs_dir / "mp", runs_dir / "mp.log")}
    yield runs
    for run in runs.values():  # a test that failed early may have left one running
        run.kill()


@pytest.fixture(scope="module")
def reference(runs_dir, background) -> Path:
    assert background["ref"].wait() == 0, background["ref"].output()
    return runs_dir / "ref"


# ---------------------------------------------------------------- helpers


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def restore(run_dir: Path) -> tuple[int, object, StepContract]:
    """(step, state on host, contract) of a run's newest checkpoint, restored on one device."""
    cfg = from_dict(Config, yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.mesh = MeshConfig(data=1, model=1)
    contract = StepContract.build(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    ck = Checkpointer(run_dir / "checkpoints", async_save=False)
    step, state, _ = ck.restore_latest(contract.abstract_state())
    ck.close()
    return step, jax.device_get(state), contract


def assert_states_bitwise_equal(a, b) -> None:
    """Every leaf of two TrainStates (params, opt state, last_fired, step, rng, ...) bit for bit."""
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8),
                                      err_msg=name)


def log_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "event" not in r]


def events(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("event") == kind]


def deterministic(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "tokens_per_s"}


# ---------------------------------------------------------------- 1. SIGKILL + resume


# Slow (the suite's time): the default suite's SIGKILL-and-resume is tests/test_object_store_e2e.py
# (async save in flight, resampling, bitwise state and metrics); exact resume on sharded meshes
# is test_families' and test_preemption's. This one adds a 2 x 2 mesh and local metrics.jsonl.
@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_exact(runs_dir, background):
    run_dir = runs_dir / "killed"
    killed = Run([sys.executable, "-c", KILLED_RUN, "train", "--quiet", *REF_ARGS,
                  f"train.run_dir={run_dir}"],
                 {**_env(4), "SAEJAX_TEST_KILL_AT": str(KILL_AT)}, runs_dir / "killed.log")
    assert killed.wait() == -signal.SIGKILL, killed.output()
    before = read_metrics(run_dir)
    assert [r["step"] for r in log_records(before)] == REF_LOG_STEPS[:KILL_AT // 5]
    ckpts = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert 10 in ckpts and max(ckpts) <= KILL_AT, ckpts  # died before the end

    resumed = Run(_train_cmd(run_dir), _env(4), runs_dir / "resumed.log")
    assert resumed.wait() == 0, resumed.output()

    assert background["ref"].wait() == 0, background["ref"].output()
    reference = runs_dir / "ref"
    step, got, _ = restore(run_dir)
    ref_step, want, _ = restore(reference)
    assert step == ref_step == 60 and int(got.step) == 60
    assert_states_bitwise_equal(got, want)

    # metrics.jsonl: each log step once, each resampling event once, one summary; the same
    # numbers as the uninterrupted run (resampling really happened in it).
    got_m, want_m = read_metrics(run_dir), read_metrics(reference)
    assert [r["step"] for r in log_records(got_m)] == REF_LOG_STEPS
    assert [r["step"] for r in events(got_m, "resample")] == REF_RESAMPLE_STEPS
    assert len(events(got_m, "summary")) == 1
    assert [deterministic(r) for r in got_m] == [deterministic(r) for r in want_m]
    assert sum(r["n_resampled"] for r in events(want_m, "resample")) > 0
    assert not any(".orbax-checkpoint-tmp" in p.name for p in (run_dir / "checkpoints").iterdir())


# ---------------------------------------------------------------- 2. NaN/Inf stops the run


def test_nonfinite_loss_stops_with_exit_3_and_keeps_last_good_checkpoint(tmp_path, capsys):
    n_rows, d, batch, bad_step = 4096, 16, 64, 25  # bad_step: 0-based index of the poisoned batch
    rows = np.random.default_rng(0).standard_normal((n_rows, d)).astype(np.float32)
    path = tmp_path / "acts.npy"
    np.save(path, rows)
    # Poison the one row that the shuffled reader serves in batch `bad_step`.
    bad_row = NpySource([path], seed=0).table_rows(bad_step, 7, 8, batch)[0]
    rows[bad_row] = np.inf
    np.save(path, rows)
    steps_with_inf = [s for s in range(40)
                      if not np.isfinite(NpySource([path], seed=0).rows(s, 0, batch, batch)).all()]
    assert steps_with_inf == [bad_step]

    run_dir = tmp_path / "run"
    command = ["train", "--quiet", "data.source=npy", f"data.paths=[{path}]",
               f"sae.d_in={d}", "sae.n_features=32", "sae.init_b_dec_median=false",
               "resample.enabled=false", "train.steps=40", f"train.batch_size={batch}",
               "train.log_every=5", "train.checkpoint_every=10", f"train.run_dir={run_dir}",
               "train.progress=false"]
    rc = cli.main(command)
    err = capsys.readouterr().err
    assert rc == 3, err
    # Named as metrics.jsonl counts steps: the batch with index 25 is the 26th step.
    assert f"loss became NaN/Inf at step {bad_step + 1}; stopped without saving" in err, err
    assert f"Last good checkpoint: 20 in {run_dir / 'checkpoints'}" in err, err

    committed = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert committed == ["10", "20"], committed
    logged = log_records(read_metrics(run_dir))
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25]  # step 30 was never written
    assert all(np.isfinite(r["loss"]) for r in logged)
    step, state, _ = restore(run_dir)
    assert step == 20 and int(state.step) == 20 and int(state.nonfinite_step) == -1
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        assert np.isfinite(np.asarray(leaf)).all()

    # Resuming re-reaches the poisoned batch and stops the same way, from the good checkpoint.
    rc = cli.main(command)
    err = capsys.readouterr().err
    assert rc == 3 and f"at step {bad_step + 1};" in err, err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["10", "20"]


# ---------------------------------------------------------------- 3. ground-truth recovery


def test_recovers_ground_truth_features(tmp_path):
    """64 true features in 32 dims (superposition), a 2× dictionary: MMCS >= 0.9."""
    from saejax.data.synthetic import SyntheticSource, mmcs

    cfg = load_config(None, [
        "sae.d_in=32", "sae.n_features=128", "sae.relu.l1_coefficient=3.5e-2",
            "sae.relu.target_l0=0",
        "data.n_true_features=64", "data.p_active=0.03", "optim.decay=constant",
        "train.steps=800", "train.batch_size=512", "train.log_every=100",
        "train.checkpoint_every=800", "resample.enabled=false", f"train.run_dir={tmp_path}"])
    summary = train(cfg, quiet=True)
    assert summary["step"] == 800
    assert summary["mmcs"] >= 0.9, summary
    assert summary["fvu"] < 0.15 and summary["dead_fraction"] == 0.0, summary

    # The summary's MMCS is that of the checkpointed decoder, and training is what earned it.
    _, state, _ = restore(tmp_path)
    features = SyntheticSource(32, 64, p_active=0.03).features
    assert mmcs(state.params["W_dec"], features) == pytest.approx(summary["mmcs"], abs=1e-6)
    init = jax.random.normal(jax.random.key(0), (128, 32))
    assert mmcs(np.asarray(init), features) < 0.7


# ---------------------------------------------------------------- 4. resampling


RESAMPLE_AT, WINDOW = 100, 20


def _dead_feature_run(run_dir: Path, resample: bool) -> list[dict]:
    """256 latents for 16 true features with a large λ: about half die by step 100."""
    cfg = load_config(None, [
        "sae.d_in=16", "sae.n_features=256", "sae.relu.l1_coefficient=1.5",
        "sae.relu.target_l0=0", "resample.at_fractions=[]",
        "data.n_true_features=16", "data.p_active=0.05", "optim.decay=constant",
        "train.steps=120", "train.batch_size=256", "train.log_every=10",
        "train.checkpoint_every=1000", f"resample.enabled={str(resample).lower()}",
        f"resample.steps=[{RESAMPLE_AT}]", f"resample.window_steps={WINDOW}",
        "resample.n_inputs=4096", f"train.dead_window_tokens={WINDOW * 256}",
        f"train.run_dir={run_dir}"])
    train(cfg, quiet=True)
    return read_metrics(run_dir)


def test_resampling_revives_dead_features(tmp_path):
    records = _dead_feature_run(tmp_path / "on", resample=True)
    by_step = {r["step"]: r for r in log_records(records)}
    (event,) = events(records, "resample")
    assert event["step"] == RESAMPLE_AT

    # Logged just before resampling, with the resampling window: exactly the features resampled.
    before = by_step[RESAMPLE_AT]["dead_fraction"]
    assert before > 0.25, by_step[RESAMPLE_AT]
    assert event["n_resampled"] == round(before * 256)

    # One full window later every feature has had a chance to fire again: the dead fraction
    # counts the resampled ones that did not, and it has fallen a lot.
    after = by_step[RESAMPLE_AT + WINDOW]["dead_fraction"]
    assert after < before / 3, (before, after)

    # Control: the same run without resampling stays dead.
    control = {r["step"]: r for r in log_records(_dead_feature_run(tmp_path / "off", False))}
    assert control[RESAMPLE_AT]["dead_fraction"] == before  # identical up to the event
    assert control[RESAMPLE_AT + WINDOW]["dead_fraction"] > 2 * after, (control, after)


# ---------------------------------------------------------------- 5. multi-process


def test_multiprocess_run_equals_single_process(runs_dir, background, reference):
    run_dir = runs_dir / "mp"
    assert background["mp"].wait() == 0, background["mp"].output()

    step, got, _ = restore(run_dir)  # the two-process checkpoint restores in one process
    _, want, _ = restore(reference)
    assert step == 60
    # Bitwise, not just close: the cross-process (gloo) all-reduces over `data` add the same two
    # partial sums as the in-process ones.
    assert_states_bitwise_equal(got, want)
    got_m, want_m = read_metrics(run_dir), read_metrics(reference)
    # Written once (by process 0), with the same numbers.
    assert [deterministic(r) for r in got_m] == [deterministic(r) for r in want_m]


@pytest.mark.slow
def test_multiprocess_with_model_axis_across_processes(tmp_path):
    """mesh data=1 × model=4 over 2 processes: each process holds half of every feature-sharded
    array and both feed the whole batch (per-process row slices follow the sharding)."""
    extra = ["mesh.data=1", "mesh.model=4"]
    mp = _multiprocess_run(tmp_path / "mp", tmp_path / "mp.log", *extra)
    single = Run(_train_cmd(tmp_path / "single", *extra), _env(4), tmp_path / "single.log")
    assert mp.wait() == 0, mp.output()
    assert single.wait() == 0, single.output()
    _, got, _ = restore(tmp_path / "mp")
    _, want, _ = restore(tmp_path / "single")
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 6. export


def test_export_matches_trained_sae_on_raw_inputs(runs_dir, reference, capsys):
    from saejax.data import make_source

    out = runs_dir / "exported"
    assert cli.main(["export", str(reference), str(out)]) == 0
    assert "wrote SAELens-format SAE" in capsys.readouterr().out
    params, cfg = load_saelens(out)

    _, state, contract = restore(reference)
    scale = float(state.input_scale)
    assert abs(scale - 1) > 0.5  # sae.scale_inputs=true: the fold into the weights is exercised
    x = make_source(contract.cfg).sample(2048, 123)  # raw activations
    sae = nnx.merge(contract.graphdef, jax.tree.map(jnp.asarray, state.params))
    f_trained = np.asarray(sae.encode(jnp.asarray(x) * scale))
    x_hat_trained = np.asarray(sae.decode(jnp.asarray(f_trained))) / scale

    f = saelens_encode(params, cfg, x)
    x_hat = saelens_decode(params, cfg, f)
    assert (f_trained > 0).sum() > 200  # features do fire on these inputs
    np.testing.assert_allclose(f, f_trained, rtol=1e-5, atol=1e-5 * np.abs(f_trained).max())
    np.testing.assert_allclose(x_hat, x_hat_trained, rtol=1e-5,
                               atol=1e-5 * np.abs(x_hat_trained).max())
    assert cfg["architecture"] == "standard" and cfg["d_sae"] == 64
    assert cfg["saejax"]["input_scale_folded"] == pytest.approx(scale)


# ---------------------------------------------------------------- config errors


def test_resume_with_changed_config_names_the_key(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["sae.d_in=16", "sae.n_features=32", "data.n_true_features=16", "train.steps=10",
            "train.batch_size=64", "train.checkpoint_every=10", "resample.enabled=false",
            "optim.decay=constant", "sae.relu.l1_warmup_fraction=0",  # nothing shaped by length
            "train.progress=false", f"train.run_dir={run_dir}"]
    assert cli.main(["train", "--quiet", *base]) == 0
    ckpt_before = sorted(os.listdir(run_dir / "checkpoints"))
    saved_before = (run_dir / "config.yaml").read_text()

    rc = cli.main(["train", "--quiet", *base, "sae.relu.l1_coefficient=0.5"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "config error" in err and "sae.relu.l1_coefficient: 0.01 -> 0.5" in err, err
    assert (run_dir / "config.yaml").read_text() == saved_before  # nothing was touched
    assert sorted(os.listdir(run_dir / "checkpoints")) == ckpt_before

    # Settings that do not change what is computed may change (more steps, another mesh, the
    # run_dir spelled another way); the run then goes on from its checkpoint.
    saved = yaml.safe_load(saved_before)
    moved = load_config(None, [*base[:-1], f"train.run_dir={os.path.relpath(run_dir)}",
                               "train.steps=20", "mesh.data=4", "mesh.model=2"])
    check_resumable(saved, moved)
    # ...but not the run length when it shapes the LR schedule.
    with pytest.raises(ConfigError, match=r"train.steps: 10 -> 20"):
        check_resumable({**saved, "optim": {**saved["optim"], "decay": "linear"}},
                        load_config(None, [*base, "train.steps=20", "optim.decay=linear"]))
    assert cli.main(["train", "--quiet", *base, "train.steps=20", "mesh.model=2"]) == 0
    assert [r["step"] for r in log_records(read_metrics(run_dir))] == [10, 20]


@pytest.mark.parametrize("override, field", [
    ("sae.n_features=abc", "sae.n_features"),
    ("sae.n_featurez=8", "sae.n_featurez"),
    ("train.batch_size=-4", "train.batch_size"),
])
def test_bad_override_exits_2_naming_the_field(tmp_path, capsys, override, field):
    rc = cli.main(["train", override, f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("saejax: config error:") and field in err, err
    assert not (tmp_path / "run").exists()


def test_bad_override_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saejax.cli", "train", "optim.decay=cubic",
                           f"train.run_dir={tmp_path / 'run'}"], cwd=REPO, env=_env(1),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert "optim.decay" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_saved_config_round_trips_for_resume(tmp_path):
    """check_resumable compares against config.yaml as saved: floats like 1e-5 must survive."""
    cfg = load_config(None, ["optim.lr=1e-5", "sae.relu.l1_coefficient=4e-3", "optim.eps=1e-8",
                             f"train.run_dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    check_resumable(yaml.safe_load((tmp_path / "config.yaml").read_text()), cfg)


# ---------------------------------------------------------------- loop plumbing


def test_resumed_metrics_drop_a_torn_last_line_and_the_old_summary(tmp_path):
    from saejax.train.runner import MetricsFile

    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (5, 10, 15)]
    lines.append(json.dumps({"step": 15, "event": "summary", "mse": 0.1}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 20, "lo')
    with MetricsFile(tmp_path, start_step=10, total_steps=20):
        pass
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10]


def test_prefetcher_hands_a_failed_batch_to_the_loop():
    from saejax.data.prefetch import Prefetcher

    def make(step):
        if step == 3:
            raise OSError("disk gone")
        return step

    batches = Prefetcher(make, 1, 10)
    assert [batches.next(), batches.next()] == [1, 2]
    with pytest.raises(OSError, match="disk gone"):  # not a loop blocked forever
        batches.next()
    batches.close()
    early = Prefetcher(lambda s: s, 0, 1000, depth=1)
    assert early.next() == 0
    early.close()  # a run that stops early does not leave the thread blocked on a full queue
    assert not early._thread.is_alive()


def _launcher():
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import local
    finally:
        sys.path.remove(str(REPO / "launch"))
    return local


def test_launcher_returns_the_failing_exit_code():
    assert _launcher().launch(2, 1, ["train", "sae.n_features=abc"], timeout=TIMEOUT) == 2


def test_launcher_stops_the_others_when_one_process_fails(tmp_path, monkeypatch):
    """Process 1 dies; process 0 would wait forever at its next collective (here: sleeps)."""
    worker = tmp_path / "worker.sh"
    worker.write_text('#!/bin/sh\n[ "$SAEJAX_PROCESS_ID" = 1 ] && exit 5\nexec sleep 600\n')
    worker.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(worker))
    import time
    t0 = time.monotonic()
    assert _launcher().launch(2, 1, [], timeout=60, grace=1.0) == 5
    assert time.monotonic() - t0 < 30
