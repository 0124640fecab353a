"""A real S3-compatible server for tests: moto's server on 127.0.0.1, started per test session.

`start()` runs `python -m moto.server` on a free loopback port, waits until it answers, and
returns an `S3Server` whose `env` (the AWS variables: endpoint, dummy credentials, region) points
boto3, s3fs and so saejax's s3:// paths at it, in this process and in the subprocesses a test
starts. Each test takes a fresh bucket (`bucket()`), so tests do not see each other's objects.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str
    env: dict[str, str]

    def bucket(self, prefix: str = "t") -> str:
        """A new empty bucket; its URL (`s3://name`)."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, url: str) -> list[str]:
        """Every object key under `url` (s3://bucket/prefix), sorted."""
        import boto3

        bucket, _, prefix = url[len("s3://"):].partition("/")
        pages = boto3.client("s3", endpoint_url=self.endpoint).get_paginator(
            "list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(timeout_s: float = 60.0) -> S3Server:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}")
            time.sleep(0.1)
    return S3Server(proc, endpoint, env)
