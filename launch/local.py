"""Run `saejax <args>` as N cooperating processes on this machine (jax.distributed on 127.0.0.1).

    python launch/local.py --processes 2 --devices-per-process 4 -- train train.run_dir=runs/mp

Each process sees its own fake CPU devices; together they form one global mesh, exercising the
real multi-host code path (per-process batch slices, cross-process collectives, one checkpoint).
On a cluster, set SAEJAX_COORDINATOR / SAEJAX_NUM_PROCESSES / SAEJAX_PROCESS_ID per host instead.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _xla_flags(devices_per_process: int) -> str:
    """The caller's XLA_FLAGS with the fake-device count set (replacing any given)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                   os.environ.get("XLA_FLAGS", "")).split()
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])


def launch(n: int, devices_per_process: int, saejax_args: list[str], timeout: float | None = None,
           grace: float = 10.0) -> int:
    """Start the n processes and wait for them; returns 0 or the first failing exit code.

    When one process fails (or `timeout` seconds pass), the others would wait forever at their
    next collective, so they are terminated (after `grace` seconds to exit on their own)."""
    port = free_port()
    procs = []
    for i in range(n):
        env = dict(os.environ,
                   SAEJAX_COORDINATOR=f"127.0.0.1:{port}", SAEJAX_NUM_PROCESSES=str(n),
                   SAEJAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=_xla_flags(devices_per_process))
        procs.append(subprocess.Popen([sys.executable, "-m", "saejax.cli", *saejax_args], env=env))
    deadline = None if timeout is None else time.monotonic() + timeout
    first_failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]  # every one, each time
            if None not in codes:
                break
            failed = [c for c in codes if c not in (None, 0)]
            if failed and first_failure is None:
                first_failure = failed[0]
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
    parser.add_argument("saejax_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.saejax_args[1:] if args.saejax_args[:1] == ["--"] else args.saejax_args
    code = launch(args.processes, args.devices_per_process, rest)
    return 128 - code if code < 0 else code  # killed by signal N: exit 128+N, as a shell does


if __name__ == "__main__":
    sys.exit(main())
