"""Run `saejax <args>` as N cooperating processes on this machine (jax.distributed on 127.0.0.1).

    python launch/local.py --processes 2 --devices-per-process 4 -- train train.run_dir=runs/mp
    python launch/local.py --env slurm ... -- train ...   # as `srun` would start them

Each process sees its own fake CPU devices; together they form one global mesh, exercising the
real multi-host code path (per-process batch slices, cross-process collectives, one checkpoint).
`--env saejax` (the default) hands each process SAEJAX_COORDINATOR / SAEJAX_NUM_PROCESSES /
SAEJAX_PROCESS_ID; `--env slurm` hands it instead exactly the variables `srun` gives the tasks of
a one-node job step (SLURM_JOB_ID, SLURM_PROCID, SLURM_STEP_NODELIST, ...), so saejax finds
the cluster through JAX's own SLURM detection (saejax/cluster.py). On real clusters see
launch/README.md.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# JAX's SLURM detection puts the coordinator on port SLURM_JOB_ID % 4096 + SLURM_PORT_BASE.
SLURM_PORT_BASE = 65535 - 2**12 + 1


def free_port(low: int | None = None, high: int | None = None) -> int:
    """A port nobody listens on now: any (the OS picks), or one in [low, high]."""
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 0 if low is None else random.randint(low, high)))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port in [{low}, {high}]")


def _xla_flags(devices_per_process: int) -> str:
    """The caller's XLA_FLAGS with the fake-device count set (replacing any given)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                   os.environ.get("XLA_FLAGS", "")).split()
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])


def slurm_env(i: int, n: int, job_id: int) -> dict[str, str]:
    """The SLURM variables `srun --ntasks=n` gives task i of a job step on one node, localhost."""
    node = "localhost"
    return {
        "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_JOB_NAME": "saejax",
        "SLURM_JOB_NODELIST": node, "SLURM_NODELIST": node, "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1", "SLURM_NTASKS": str(n), "SLURM_NPROCS": str(n),
        "SLURM_TASKS_PER_NODE": str(n), "SLURM_JOB_CPUS_PER_NODE": str(os.cpu_count()),
        "SLURM_CPUS_ON_NODE": str(os.cpu_count()), "SLURM_NODEID": "0",
        "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NODELIST": node,
        "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": str(n),
        "SLURM_STEP_TASKS_PER_NODE": str(n), "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
        "SLURM_GTIDS": ",".join(map(str, range(n))), "SLURMD_NODENAME": node,
        "SLURM_TOPOLOGY_ADDR": node, "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
        "SLURM_SRUN_COMM_HOST": "127.0.0.1", "SLURM_SUBMIT_HOST": node,
        "SLURM_SUBMIT_DIR": os.getcwd(), "SLURM_CLUSTER_NAME": "local",
        "SLURM_JOB_PARTITION": "local",
    }


def worker_envs(n: int, devices_per_process: int, env_style: str = "saejax") -> list[dict]:
    """The environment of each of the n processes: the caller's, minus any cluster variables it
    had, plus the fake CPU devices and either SAEJAX_* or srun's SLURM_* variables."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SLURMD_", "SAEJAX_COORDINATOR", "SAEJAX_NUM_PROCESSES",
                                 "SAEJAX_PROCESS_ID", "OMPI_"))}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS=_xla_flags(devices_per_process))
    if env_style == "slurm":  # a job id whose derived coordinator port is free now
        job_id = 4096 * 100 + free_port(SLURM_PORT_BASE, 65535) - SLURM_PORT_BASE
        return [dict(base, **slurm_env(i, n, job_id)) for i in range(n)]
    if env_style != "saejax":
        raise ValueError(f"env_style must be 'saejax' or 'slurm', not {env_style!r}")
    port = free_port()
    return [dict(base, SAEJAX_COORDINATOR=f"127.0.0.1:{port}", SAEJAX_NUM_PROCESSES=str(n),
                 SAEJAX_PROCESS_ID=str(i)) for i in range(n)]


def _describe(code: int) -> str:
    """ "exit 2", "killed by SIGKILL" """
    if code >= 0:
        return f"exit {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def launch(n: int, devices_per_process: int, saejax_args: list[str], timeout: float | None = None,
           grace: float = 10.0, env_style: str = "saejax") -> int:
    """Start the n processes and wait for them; returns 0 or the first failing exit code.

    When one process fails (or `timeout` seconds pass), the others would wait at their next
    collective until the distributed runtime's heartbeat timeout stops them, so they are
    terminated (after `grace` seconds to exit on their own)."""
    procs = [subprocess.Popen([sys.executable, "-m", "saejax.cli", *saejax_args], env=env)
             for env in worker_envs(n, devices_per_process, env_style)]

    def forward(signum, frame):  # a scheduler's preemption notice: every worker checkpoints
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, forward)
    deadline = None if timeout is None else time.monotonic() + timeout
    first_failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]  # every one, each time
            if None not in codes:
                break
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and first_failure is None:
                i, first_failure = failed[0]
                print(f"launch/local.py: process {i} of {n} failed ({_describe(first_failure)}); "
                      f"stopping the others", file=sys.stderr)
                deadline = min(deadline or float("inf"), time.monotonic() + grace)
            if deadline is not None and time.monotonic() > deadline:
                if first_failure is None:
                    print(f"launch/local.py: timed out after {timeout} s", file=sys.stderr)
                    first_failure = 124
                break
            time.sleep(0.05)
    finally:  # also on KeyboardInterrupt: leave no process behind
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if first_failure is None:
        first_failure = next((p.returncode for p in procs if p.returncode != 0), 0)
    return first_failure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--env", choices=["saejax", "slurm"], default="saejax",
                        help="how each process learns its place: SAEJAX_* variables, or the "
                             "SLURM_* variables srun would set (JAX's SLURM detection)")
    parser.add_argument("saejax_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.saejax_args[1:] if args.saejax_args[:1] == ["--"] else args.saejax_args
    code = launch(args.processes, args.devices_per_process, rest, env_style=args.env)
    return 128 - code if code < 0 else code  # killed by signal N: exit 128+N, as a shell does


if __name__ == "__main__":
    sys.exit(main())
