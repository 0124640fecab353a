"""Object storage end to end, against a real S3-compatible server (moto, on 127.0.0.1): harvest
an LM's activations into a bucket, train from them with the run directory (config, metrics,
checkpoints) in the bucket, SIGKILL the run after a checkpoint, rerun the same command, and end
bitwise equal to an uninterrupted run; export the run into the bucket as SAELens files equal to
a local export of the uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import yaml
from safetensors.numpy import load

from saejax import cli
from saejax.checkpoint import Checkpointer
from saejax.config import Config, MeshConfig, from_dict
from saejax.paths import as_path
from saejax.sharding import make_mesh
from saejax.train.step import StepContract
from tiny_world import D_MLP, SITE
from test_train_e2e import KILLED_RUN, assert_states_bitwise_equal, deterministic

REPO = Path(__file__).resolve().parents[1]
KILL_AT = 20
ARGS = ["train", "--quiet", "data.source=store", f"data.site={SITE}", f"sae.d_in={D_MLP}",
        "sae.n_features=64", "sae.relu.l1_coefficient=1e-3", "train.steps=30",
        "train.batch_size=32", "train.log_every=10", "train.checkpoint_every=10",
        "train.progress=false", "resample.at_fractions=[0.5]", "resample.window_steps=5",
        "resample.n_inputs=256"]


def final_state(run: str):
    """(step, state on host) of a run's newest checkpoint, restored on one device."""
    cfg = from_dict(Config, yaml.safe_load(as_path(f"{run}/config.yaml").read_text()))
    cfg.mesh = MeshConfig(data=1, model=1)
    contract = StepContract.build(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    ck = Checkpointer(as_path(f"{run}/checkpoints"), read_only=True)
    step, state, _ = ck.restore_latest(contract.abstract_state())
    return step, jax.device_get(state)


def metrics(run: str) -> list[dict]:
    lines = as_path(f"{run}/metrics.jsonl").read_text().splitlines()
    return [deterministic(json.loads(line)) for line in lines]


def test_harvest_train_kill_resume_export_in_a_bucket(tiny_world, s3_server, tmp_path):
    bucket = s3_server.bucket()
    acts, run, export = f"{bucket}/acts", f"{bucket}/run", f"{bucket}/export"
    assert cli.main(["harvest", str(tiny_world.lm), str(tiny_world.tokens), acts,
                     "--site", SITE, "--contexts-per-shard", "64"]) == 0
    assert f"{acts[5:].split('/', 1)[1]}/manifest.json" in s3_server.keys(acts)
    train = [*ARGS, f"data.store_path={acts}"]

    # The uninterrupted reference (its run directory local) and the run in the bucket that is
    # killed, side by side; then the same command again. One device each: they start fast.
    env = dict(os.environ, SAEJAX_TEST_KILL_AT=str(KILL_AT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("SAEJAX_COORDINATOR", None)
    ref = tmp_path / "ref"
    cmd = [sys.executable, "-m", "saejax.cli", *train]
    procs = {"ref": subprocess.Popen([*cmd, f"train.run_dir={ref}"], cwd=REPO, env=env,
                                     stderr=subprocess.PIPE, text=True),
             "killed": subprocess.Popen([sys.executable, "-c", KILLED_RUN, *train,
                                         f"train.run_dir={run}"], cwd=REPO, env=env,
                                        stderr=subprocess.PIPE, text=True)}
    errs = {name: p.communicate(timeout=300)[1][-3000:] for name, p in procs.items()}
    assert procs["ref"].returncode == 0, errs["ref"]
    assert procs["killed"].returncode == -9, errs["killed"]
    saved = Checkpointer(as_path(f"{run}/checkpoints"), read_only=True).latest_step()
    assert saved in (KILL_AT - 10, KILL_AT), saved  # the step being uploaded may be lost, no more
    resumed = subprocess.run([*cmd, f"train.run_dir={run}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    step_ref, state_ref = final_state(str(ref))
    step_run, state_run = final_state(run)
    assert step_ref == step_run == 30
    assert_states_bitwise_equal(state_run, state_ref)
    assert metrics(run) == metrics(str(ref))

    assert cli.main(["export", run, export]) == 0
    assert cli.main(["export", str(ref), str(tmp_path / "export")]) == 0
    local = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert sorted(p.name for p in as_path(export).iterdir()) == local
    for name in local:
        if name.endswith(".safetensors"):
            got = load(as_path(f"{export}/{name}").read_bytes())
            want = load((tmp_path / "export" / name).read_bytes())
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}:{k}")
