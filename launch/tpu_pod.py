"""Run `saejax <args>` on every worker of a Cloud TPU pod slice (one process per TPU VM host).

    python launch/tpu_pod.py --tpu my-v5p-64 --zone us-east5-a -- \
        train train.run_dir=/mnt/shared/runs/a sae.n_features=1048576 mesh.model=8
    python launch/tpu_pod.py --dry-run ...     # print the gcloud command instead of running it

It runs `gcloud compute tpus tpu-vm ssh <tpu> --worker=all --command '...'`: the same command
on all hosts at once. Each host's saejax finds the pod through JAX's TPU detection (the VM's
metadata server; saejax/cluster.py) and drives its own chips; no addresses to pass. The
checkout (or an installed saejax) must already be on every host at --workdir, and the run
directory must be one every host sees. See launch/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys


def remote_command(saejax_args: list[str], workdir: str, env: list[str], saejax: str) -> str:
    """The shell line each worker runs."""
    home, rest = ("~/", workdir[2:]) if workdir.startswith("~/") else ("", workdir)
    exports = [f"export {shlex.quote(kv)}" for kv in env]
    return " && ".join([f"cd {home}{shlex.quote(rest)}", *exports,
                        f"{saejax} {shlex.join(saejax_args)}"])


def gcloud_command(args: argparse.Namespace, saejax_args: list[str]) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return [*cmd, "--worker=all",
            f"--command={remote_command(saejax_args, args.workdir, args.env, args.saejax)}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="the TPU VM (pod slice) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", help="the Google Cloud project (default: gcloud's)")
    parser.add_argument("--workdir", default="~/saejax",
                        help="directory on every worker to run in (default: ~/saejax)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="exported on every worker first, e.g. SAEJAX_HEARTBEAT_TIMEOUT_S=60 "
                             "(repeatable)")
    parser.add_argument("--saejax", default="python3 -m saejax.cli",
                        help="the command that runs saejax on the workers")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument("saejax_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.saejax_args[1:] if args.saejax_args[:1] == ["--"] else args.saejax_args
    if not rest:
        parser.error("no saejax command given (e.g. -- train train.run_dir=...)")
    bad = [kv for kv in args.env if "=" not in kv]
    if bad:
        parser.error(f"--env takes NAME=VALUE, not {bad[0]!r}")
    cmd = gcloud_command(args, rest)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
