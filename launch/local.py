"""Run `saejax <args>` as N cooperating processes on this machine (jax.distributed on 127.0.0.1).

    python launch/local.py --processes 2 --devices-per-process 4 -- train train.run_dir=runs/mp

Each process sees its own fake CPU devices; together they form one global mesh, exercising the
real multi-host code path (per-process batch slices, cross-process collectives, one checkpoint).
On a cluster, set SAEJAX_COORDINATOR / SAEJAX_NUM_PROCESSES / SAEJAX_PROCESS_ID per host instead.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, devices_per_process: int, saejax_args: list[str], timeout: float | None = None) -> int:
    port = free_port()
    procs = []
    for i in range(n):
        env = dict(os.environ,
                   SAEJAX_COORDINATOR=f"127.0.0.1:{port}", SAEJAX_NUM_PROCESSES=str(n),
                   SAEJAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
        procs.append(subprocess.Popen([sys.executable, "-m", "saejax.cli", *saejax_args], env=env))
    codes = [p.wait(timeout=timeout) for p in procs]
    return max(codes, key=abs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("saejax_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.saejax_args[1:] if args.saejax_args[:1] == ["--"] else args.saejax_args
    return launch(args.processes, args.devices_per_process, rest)


if __name__ == "__main__":
    sys.exit(main())
