"""Run `saejax <args>` as a Kubernetes indexed Job: N pods, one process each, one global mesh.

    python launch/k8s.py --name sae-a --image registry.example.com/saejax:latest \
        --processes 4 --gpus-per-process 8 --pvc runs:/runs -- \
        train train.run_dir=/runs/a sae.n_features=131072
    python launch/k8s.py --dry-run ...     # print the manifest instead of applying it

The manifest (`kubectl apply -f -`) is a headless Service and an indexed Job of that name
(completionMode: Indexed, parallelism = completions = N). Pod i is `<name>-i`, reachable as
`<name>-i.<name>` through the Service, so every pod is told the coordinator `<name>-0.<name>`,
N, and its own index (the Job's completion index) through SAEJAX_* variables: that needs no
Kubernetes API access from the pods (JAX's own Kubernetes detection does; see
launch/README.md). backoffLimit 0: when a pod fails the Job fails and Kubernetes stops the
others; applying the same manifest again (after `kubectl delete job,service <name>`) resumes
from the last checkpoint. The run directory must be on storage every pod mounts (--pvc, a
ReadWriteMany claim).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import yaml

PORT = 8476  # the coordinator's port on pod 0
INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def manifest(name: str, image: str, processes: int, saejax_args: list[str], *,
             gpus: int = 0, namespace: str | None = None, env: list[str] = (),
             pvc: str | None = None) -> list[dict]:
    """[Service, Job] for the run."""
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                        "selector": {"job-name": name}}}
    container = {
        "name": "saejax", "image": image, "command": ["saejax", *saejax_args],
        "env": [{"name": "SAEJAX_COORDINATOR", "value": f"{name}-0.{name}:{PORT}"},
                {"name": "SAEJAX_NUM_PROCESSES", "value": str(processes)},
                {"name": "SAEJAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": INDEX}}},
                *({"name": k, "value": v} for k, v in (kv.split("=", 1) for kv in env))],
        "ports": [{"containerPort": PORT, "name": "coordinator"}],
    }
    pod = {"subdomain": name, "restartPolicy": "Never", "containers": [container]}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
    if pvc:
        claim, mount = pvc.split(":", 1)
        container["volumeMounts"] = [{"name": "runs", "mountPath": mount}]
        pod["volumes"] = [{"name": "runs", "persistentVolumeClaim": {"claimName": claim}}]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
           "spec": {"completionMode": "Indexed", "completions": processes,
                    "parallelism": processes, "backoffLimit": 0,
                    "template": {"spec": pod}}}
    return [service, job]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the Job's and Service's name")
    parser.add_argument("--image", required=True, help="a container image with saejax installed")
    parser.add_argument("--processes", type=int, required=True, help="pods, one process each")
    parser.add_argument("--gpus-per-process", type=int, default=0,
                        help="nvidia.com/gpu per pod (default 0: CPU)")
    parser.add_argument("--namespace")
    parser.add_argument("--pvc", metavar="CLAIM:MOUNT",
                        help="a persistent volume claim every pod mounts at MOUNT (for run_dir)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in every pod, e.g. SAEJAX_HEARTBEAT_TIMEOUT_S=60 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the manifest, apply nothing")
    parser.add_argument("saejax_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.saejax_args[1:] if args.saejax_args[:1] == ["--"] else args.saejax_args
    if not rest:
        parser.error("no saejax command given (e.g. -- train train.run_dir=...)")
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    for kv in args.env:
        if "=" not in kv:
            parser.error(f"--env takes NAME=VALUE, not {kv!r}")
    if args.pvc and ":" not in args.pvc:
        parser.error(f"--pvc takes CLAIM:MOUNT, not {args.pvc!r}")
    text = yaml.safe_dump_all(
        manifest(args.name, args.image, args.processes, rest, gpus=args.gpus_per_process,
                 namespace=args.namespace, env=args.env, pvc=args.pvc), sort_keys=False)
    if args.dry_run:
        print(text, end="")
        return 0
    return subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True).returncode


if __name__ == "__main__":
    sys.exit(main())
