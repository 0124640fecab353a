"""Test setup: 8 fake CPU devices so real meshes run on one machine (set before jax imports)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The tiny text -> LM -> SAE world of tests/tiny_world.py, built once per session."""
    from tiny_world import build

    return build(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for the whole session, its AWS variables set in this
    process (subprocesses inherit them), and s3:// checkpoints staged under the session's tmp
    directory (SAEJAX_STAGING_DIR); tests take a fresh bucket each (`s3_server.bucket()`)."""
    from s3_server import start

    server = start()
    server.env["SAEJAX_STAGING_DIR"] = str(tmp_path_factory.mktemp("s3_staging"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
