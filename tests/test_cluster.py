"""Cluster start-up (saejax/cluster.py) and the launchers (launch/).

- Two processes of 4 devices started with exactly the environment `srun` gives its tasks (no
  SAEJAX_* variables; launch/local.py --env slurm) find the cluster through JAX's SLURM
  detection, say so in one line each, and end bitwise equal to one process of 8 devices. That
  one also runs under jax.distributed (SAEJAX_NUM_PROCESSES=1), so its collectives are gloo's
  too: gloo sums a 4-way all-reduce in another order than XLA's in-process collectives do
  (~15% of W_dec elements then differ in the last bit), which says nothing about the run's
  layout. tests/test_train_e2e.py compares in-process with multi-process where every
  collective has 2 participants (so both orders agree).
- A dead peer: one of two processes is SIGKILLed right after starting a checkpoint save; the
  other is stopped by the distributed runtime within the heartbeat timeout, and the last
  committed checkpoint restores, bitwise equal to the single-process run's at that step.
- The TPU-pod and Kubernetes launchers' dry runs print what they would run/apply; the sbatch
  template passes `bash -n` and hands srun the command.
- On a plain machine (or in an `sbatch` batch step, or a 1-task step) `initialize()` stays one
  process and says so.

The three runs start together in the background (module fixture).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
import yaml

from saejax import cluster
from test_train_e2e import (KILLED_RUN, REPO, Run, _launcher,
                            assert_states_bitwise_equal, restore)

ARGS = ["train", "--quiet", "sae.d_in=16", "sae.n_features=64", "data.n_true_features=16",
        "train.steps=20", "train.batch_size=64", "train.log_every=5", "train.checkpoint_every=5",
        "train.keep_checkpoints=4", "train.progress=false", "resample.n_inputs=1024",
        "mesh.data=4", "mesh.model=2"]
KILL_AT = 10      # process 1 of the dead-peer run dies right after starting this step's save
HEARTBEAT_S = 5   # SAEJAX_HEARTBEAT_TIMEOUT_S of the dead-peer run
DIED = "This most likely indicates that another task died"  # JAX's words when it stops a survivor


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"ref": [Run], "slurm": [Run, Run], "dead": [Run, Run], "dir": Path}, started now."""
    d = tmp_path_factory.mktemp("cluster")
    local = _launcher()
    [env] = local.worker_envs(1, 8)
    ref = Run([sys.executable, "-m", "saejax.cli", *ARGS, f"train.run_dir={d / 'ref'}"], env,
              d / "ref.log")
    started = {"dir": d, "ref": [ref], "slurm": [], "dead": []}
    for i, env in enumerate(local.worker_envs(2, 4, env_style="slurm")):
        started["slurm"].append(Run([sys.executable, "-m", "saejax.cli", *ARGS,
                                     f"train.run_dir={d / 'slurm'}"], env, d / f"slurm{i}.log"))
    for i, env in enumerate(local.worker_envs(2, 4, env_style="slurm")):
        env = dict(env, SAEJAX_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S),
                   SAEJAX_TEST_KILL_AT=str(KILL_AT if i == 1 else -1))
        started["dead"].append(Run([sys.executable, "-c", KILLED_RUN, *ARGS,
                                    f"train.run_dir={d / 'dead'}"], env, d / f"dead{i}.log"))
    yield started
    for run in started["ref"] + started["slurm"] + started["dead"]:
        run.kill()


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    """The same config as one process of 8 devices."""
    [run] = runs["ref"]
    assert run.wait() == 0, run.output()
    assert "saejax: SAEJAX_* variables, process 0 of 1, coordinator 127.0.0.1:" in run.output()
    return runs["dir"] / "ref"


def _restore_step(run_dir: Path, step: int, tmp: Path):
    """restore() of one committed step of a run (a copy of the run holding only that step)."""
    (tmp / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", tmp / "config.yaml")
    shutil.copytree(run_dir / "checkpoints" / str(step), tmp / "checkpoints" / str(step))
    return restore(tmp)


def test_srun_environment_joins_and_matches_one_process(runs, reference):
    procs = runs["slurm"]
    for run in procs:
        assert run.wait() == 0, run.output()
    for i, run in enumerate(procs):
        first = next(line for line in run.output().splitlines() if line.startswith("saejax:"))
        assert first.startswith(f"saejax: SLURM cluster, process {i} of 2, coordinator "
                                "localhost:"), first
        assert first.endswith(", 4 local devices"), first
    step, got, _ = restore(runs["dir"] / "slurm")
    ref_step, want, _ = restore(reference)
    assert step == ref_step == 20
    assert_states_bitwise_equal(got, want)


def test_dead_peer_stops_the_survivor_and_the_checkpoint_restores(runs, reference, tmp_path):
    survivor, victim = runs["dead"]
    assert victim.wait() == -9, victim.output()
    died = time.monotonic()
    code = survivor.wait()
    waited = time.monotonic() - died
    out = survivor.output()
    # The runtime declares process 1 dead after HEARTBEAT_S s without a heartbeat and stops the
    # others (SIGABRT); the margin is for a loaded machine.
    assert code == -6 and DIED in out, out
    assert waited < HEARTBEAT_S + 20, (waited, out)

    step, got, _ = restore(runs["dir"] / "dead")  # newest committed, fingerprints verified
    assert step == KILL_AT - 5, step  # the save in flight at the kill never committed
    _, want, _ = _restore_step(reference, step, tmp_path / "ref")
    assert_states_bitwise_equal(got, want)


# ---------------------------------------------------------------- the launchers


def _load(name: str):
    """launch/<name>.py as a module (launch/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tpu_pod_dry_run_prints_the_gcloud_command(capsys):
    assert _load("tpu_pod").main(["--tpu", "pod1", "--zone", "us-east5-a", "--project", "p",
                                  "--env", "SAEJAX_HEARTBEAT_TIMEOUT_S=60", "--dry-run", "--",
                                  "train", "train.run_dir=/mnt/runs/a b", "sae.d_in=16"]) == 0
    printed = capsys.readouterr().out
    assert printed == (
        "gcloud compute tpus tpu-vm ssh pod1 --zone=us-east5-a --project=p --worker=all "
        "'--command=cd ~/saejax && export SAEJAX_HEARTBEAT_TIMEOUT_S=60 && python3 -m "
        "saejax.cli train '\"'\"'train.run_dir=/mnt/runs/a b'\"'\"' sae.d_in=16'\n")
    remote = shlex.split(printed)[-1].removeprefix("--command=")
    assert shlex.split(remote)[-3:] == ["train", "train.run_dir=/mnt/runs/a b", "sae.d_in=16"]


def test_kubernetes_dry_run_prints_an_indexed_job(capsys):
    assert _load("k8s").main(["--name", "sae-a", "--image", "reg/saejax:1", "--processes", "4",
                              "--gpus-per-process", "8", "--pvc", "runs:/runs", "--env",
                              "SAEJAX_HEARTBEAT_TIMEOUT_S=60", "--dry-run", "--", "train",
                              "train.run_dir=/runs/a"]) == 0
    service, job = yaml.safe_load_all(capsys.readouterr().out)
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": "sae-a"}
    spec = job["spec"]
    assert (job["kind"], spec["completionMode"], spec["completions"], spec["parallelism"],
            spec["backoffLimit"]) == ("Job", "Indexed", 4, 4, 0)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "sae-a" and pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["command"] == ["saejax", "train", "train.run_dir=/runs/a"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env == {
        "SAEJAX_COORDINATOR": "sae-a-0.sae-a:8476", "SAEJAX_NUM_PROCESSES": "4",
        "SAEJAX_PROCESS_ID": {"fieldRef": {"fieldPath": "metadata.annotations["
                                           "'batch.kubernetes.io/job-completion-index']"}},
        "SAEJAX_HEARTBEAT_TIMEOUT_S": "60"}
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert container["volumeMounts"] == [{"name": "runs", "mountPath": "/runs"}]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "runs"}


def test_sbatch_template_hands_srun_the_command(tmp_path):
    script = REPO / "launch" / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "--gpus-per-task=1" in text
    fake = tmp_path / "srun"  # prints what srun would have been given
    fake.write_text('#!/bin/sh\necho "srun $*"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    out = subprocess.run(["bash", str(script), "train", "train.run_dir=/shared/a"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out == "srun --kill-on-bad-exit=1 --label saejax train train.run_dir=/shared/a\n"


# ---------------------------------------------------------------- one process


CLUSTER_VARS = ("SLURM_", "SLURMD_", "OMPI_", "SAEJAX_COORDINATOR", "SAEJAX_NUM_PROCESSES",
                "SAEJAX_PROCESS_ID", "SAEJAX_CLUSTER", "KUBERNETES_", "JOB_COMPLETION_INDEX",
                "TPU_WORKER", "TPU_PROCESS_ADDRESSES", "MEGASCALE_", "JAX_COORDINATOR")


@pytest.fixture
def plain_env(monkeypatch):
    """This process's environment without any cluster's variables."""
    for name in list(os.environ):
        if name.startswith(CLUSTER_VARS):
            monkeypatch.delenv(name)
    return monkeypatch


def test_plain_machine_stays_one_process(plain_env):
    found = cluster.initialize()
    assert str(found) == f"saejax: single process, {jax.local_device_count()} local devices"
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_sbatch_batch_step_and_one_task_steps_stay_one_process(plain_env):
    local = _launcher()
    batch_step = {k: v for k, v in local.slurm_env(0, 2, 4711).items() if "STEP" not in k}
    for name, value in batch_step.items():  # `sbatch --ntasks=2` running saejax without srun
        plain_env.setenv(name, value)
    assert str(cluster.initialize()).startswith("saejax: single process")
    for name, value in local.slurm_env(0, 1, 4711).items():  # `srun --ntasks=1`
        plain_env.setenv(name, value)
    assert str(cluster.initialize()).startswith("saejax: SLURM cluster of 1 process: single")
    plain_env.setenv("SAEJAX_CLUSTER", "none")
    assert str(cluster.initialize()).startswith("saejax: single process")
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("tasks, visible, want", [
    ("1(x2)", "0,1,2,3", []),     # one process per node: all its GPUs
    ("4(x2)", "2", []),           # one per GPU, bound by SLURM (--gpus-per-task=1): the one it sees
    ("4(x2)", "0,1,2,3", None),   # one per GPU, each seeing all: JAX picks GPU SLURM_LOCALID
    ("4(x2)", None, None),
])
def test_local_devices_per_node_or_per_gpu(plain_env, tasks, visible, want):
    plain_env.setenv("SLURM_STEP_TASKS_PER_NODE", tasks)
    plain_env.setenv("SLURM_NODEID", "1")
    if visible is None:
        plain_env.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        plain_env.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert cluster._local_device_ids() == want


def test_bad_saejax_variables_are_one_line_errors(plain_env):
    plain_env.setenv("SAEJAX_COORDINATOR", "127.0.0.1:1234")
    plain_env.setenv("SAEJAX_NUM_PROCESSES", "two")
    with pytest.raises(cluster.ClusterError, match="SAEJAX_NUM_PROCESSES and SAEJAX_PROCESS_ID"):
        cluster.initialize()
    assert not jax.distributed.is_initialized()


def test_timeouts_from_the_environment(plain_env):
    assert cluster.timeouts() == cluster.TIMEOUTS
    plain_env.setenv("SAEJAX_HEARTBEAT_TIMEOUT_S", "7")
    assert cluster.timeouts()["SAEJAX_HEARTBEAT_TIMEOUT_S"] == 7
    plain_env.setenv("SAEJAX_HEARTBEAT_TIMEOUT_S", "soon")
    with pytest.raises(cluster.ClusterError, match="SAEJAX_HEARTBEAT_TIMEOUT_S='soon'"):
        cluster.timeouts()
