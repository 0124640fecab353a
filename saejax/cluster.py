"""Joining a multi-process run: `jax.distributed` started from the environment the process is in.

`initialize()` decides, in this order:

1. `SAEJAX_COORDINATOR`, `SAEJAX_NUM_PROCESSES`, `SAEJAX_PROCESS_ID` set: those (launch/local.py,
   or any launcher that sets them by hand).
2. A cluster that JAX's own detection finds (SLURM `srun` tasks, Open MPI `mpirun`, Cloud TPU
   pod workers, GKE TPU pods, Kubernetes indexed Jobs): `jax.distributed.initialize()` with no
   addresses, so JAX reads the scheduler's environment itself.
3. Otherwise (a plain machine, an `sbatch` batch step without `srun`, a 1-task job): one process.

`SAEJAX_CLUSTER=none` forces 3; `SAEJAX_CLUSTER=<JAX method>` (slurm, ompi, mpi4py, gcetpu,
gketpu) uses only that detector. Every process that joins a multi-process run prints one line
to stderr, e.g. "saejax: SLURM cluster, process 1 of 2, coordinator node01:61571, 4 local
devices": on a cluster each process's log is its own (srun --output=%t, pod logs, TPU workers),
so each says who it is, and a process that never joined is the one whose line is missing. A
single process prints nothing (its output stays as it always was); the line is returned.

A process that dies makes the others exit: the distributed runtime's coordination service marks
a process dead after `SAEJAX_HEARTBEAT_TIMEOUT_S` without a heartbeat and then terminates every
other process, wherever it is (in a collective, a checkpoint barrier, the exit barrier), with
JAX's "Terminating process because the JAX distributed service detected fatal errors. This most
likely indicates that another task died" and SIGABRT; when process 0, which hosts the service,
dies, the others see its connection close and stop at once. saejax cannot put its own line
there: JAX has no hook for it (jaxlib 0.10.2's client takes a missed-heartbeat callback, but
calling a Python one fails converting its status argument: std::bad_cast), and the survivor's
Python code is blocked inside the collective. Checkpoints are committed atomically
(saejax.checkpoint), so the last committed one stays intact and the same command resumes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from saejax.errors import SaejaxError

# The distributed runtime's timeouts, seconds (env var: default). Heartbeat: a process silent
# this long counts as dead and the others are stopped (JAX's default is 100 s). Shutdown: how
# long a finished process waits at exit for the others to finish too (a peer that died is
# noticed by the heartbeat first). Init: how long processes wait for all to join (pods and
# nodes may start minutes apart).
TIMEOUTS = {"SAEJAX_HEARTBEAT_TIMEOUT_S": 30, "SAEJAX_SHUTDOWN_TIMEOUT_S": 300,
            "SAEJAX_INIT_TIMEOUT_S": 300}

# How the line names JAX's cluster detectors (jax/_src/clusters/*.py).
_NAMES = {"SlurmCluster": "SLURM cluster", "OmpiCluster": "Open MPI job",
          "Mpi4pyCluster": "MPI job (mpi4py)", "GceTpuCluster": "Cloud TPU pod",
          "GkeTpuCluster": "GKE TPU pod", "K8sCluster": "Kubernetes indexed Job"}


class ClusterError(SaejaxError, RuntimeError):
    """The environment names a cluster that cannot be joined (bad variables, a coordinator that
    never answers within the init timeout)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What `initialize()` found; `str()` is the one line it prints."""
    found: str                 # "SLURM cluster", "SAEJAX_* variables", "single process", ...
    process: int = 0
    processes: int = 1
    coordinator: str | None = None
    local_devices: int = 0

    def __str__(self) -> str:
        if self.coordinator is None:
            return f"saejax: {self.found}, {self.local_devices} local devices"
        return (f"saejax: {self.found}, process {self.process} of {self.processes}, "
                f"coordinator {self.coordinator}, {self.local_devices} local devices")


def timeouts() -> dict[str, int]:
    """{env var: seconds} in force: each from the environment when set, else its default."""
    out = {}
    for name, default in TIMEOUTS.items():
        value = os.environ.get(name, str(default))
        if not value.isdigit() or int(value) < 1:
            raise ClusterError(f"{name}={value!r}: expected a whole number of seconds >= 1")
        out[name] = int(value)
    return out


def _jax_cluster():
    """The JAX cluster detector (a ClusterEnv class) that finds this process's environment, or
    None. JAX has no public call for "which cluster am I in", so its detector list is read."""
    from jax._src import clusters

    wanted = os.environ.get("SAEJAX_CLUSTER", "auto")
    if wanted == "none":
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if wanted == "auto" and env.opt_in_only_method:
            continue  # mpi4py: only when asked for, as in JAX
        if wanted not in ("auto", env.name):
            continue
        # A pod outside an indexed Job (a notebook on Kubernetes, say) is no multi-process job;
        # asking JAX would need the `kubernetes` package and API permissions for nothing.
        if env.__name__ == "K8sCluster" and "JOB_COMPLETION_INDEX" not in os.environ:
            continue
        if env.is_env_present():
            return env
    if wanted != "auto":
        names = ", ".join(e.name for e in clusters.ClusterEnv._cluster_types if e.name)
        raise ClusterError(f"SAEJAX_CLUSTER={wanted}: no such cluster found in this environment "
                           f"(JAX's detectors: {names}; or auto, none)")
    return None


def _tasks_on_this_node() -> int | None:
    """How many processes of the job run on this node, from the scheduler's environment."""
    if "OMPI_COMM_WORLD_LOCAL_SIZE" in os.environ:
        return int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE"))
    if not spec:
        return None
    counts = []  # "2(x3),1" -> [2, 2, 2, 1], one per node of the step
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts += [int(count)] * int(repeat or 1)
    node = int(os.environ.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else None


def _local_device_ids() -> list[int] | None:
    """The GPUs this process drives: None lets JAX choose, [] means every GPU it sees.

    JAX assumes one process per GPU with every process seeing all GPUs of its node, and picks GPU
    number SLURM_LOCALID (or Open MPI's local rank). Two other common layouts need every visible
    GPU instead: one process per node (`--ntasks-per-node=1`), and one per GPU where the
    scheduler already gave each process its own GPU (`--gpus-per-task=1`: CUDA_VISIBLE_DEVICES
    names one, and JAX's pick would miss it for every process but the node's first). Ignored on
    CPU and TPU; JAX_LOCAL_DEVICE_IDS, when set, decides instead (JAX reads it itself)."""
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    tasks = _tasks_on_this_node()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("ROCR_VISIBLE_DEVICES"))
    if tasks == 1 or (visible is not None and len(visible.split(",")) == 1):
        return []  # JAX restricts nothing for an empty list (and detection leaves it alone)
    return None


def _local_devices() -> int:
    import jax

    return jax.local_device_count()


def initialize() -> Cluster:
    """Join the multi-process run this process belongs to, if any (see the module docstring),
    print the one line saying what was found, and return it. Must run before anything touches
    a JAX device; once joined, calling it again only describes the run joined."""
    import jax
    from jax._src.distributed import global_state  # the coordinator address JAX settled on

    if jax.distributed.is_initialized():  # a second command in the same process (tests)
        return Cluster("multi-process run already joined", jax.process_index(),
                       jax.process_count(), global_state.coordinator_address, _local_devices())
    limits = timeouts()
    kw = dict(initialization_timeout=limits["SAEJAX_INIT_TIMEOUT_S"],
              heartbeat_timeout_seconds=limits["SAEJAX_HEARTBEAT_TIMEOUT_S"],
              shutdown_timeout_seconds=limits["SAEJAX_SHUTDOWN_TIMEOUT_S"])
    if os.environ.get("SAEJAX_COORDINATOR"):
        found = "SAEJAX_* variables"
        try:
            kw.update(coordinator_address=os.environ["SAEJAX_COORDINATOR"],
                      num_processes=int(os.environ["SAEJAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["SAEJAX_PROCESS_ID"]),
                      cluster_detection_method="deactivate")
        except (KeyError, ValueError) as e:
            raise ClusterError(f"SAEJAX_COORDINATOR is set, so SAEJAX_NUM_PROCESSES and "
                               f"SAEJAX_PROCESS_ID must be whole numbers ({e})") from None
    else:
        env = _jax_cluster()
        if env is None:
            return Cluster("single process", local_devices=_local_devices())
        found = _NAMES.get(env.__name__, env.__name__)
        if env.get_process_count() == 1:  # nothing to join; no coordinator port to collide on
            return Cluster(f"{found} of 1 process: single process", local_devices=_local_devices())
        kw.update(local_device_ids=_local_device_ids(), cluster_detection_method=env.name or None)
    try:
        jax.distributed.initialize(**kw)
    except Exception as e:  # JAX's errors here are multi-line gRPC statuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"cannot join the multi-process run ({found}): {first}") from e
    cluster = Cluster(found, jax.process_index(), jax.process_count(),
                      global_state.coordinator_address, _local_devices())
    print(cluster, file=sys.stderr, flush=True)
    return cluster
