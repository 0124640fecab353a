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
