"""Run directories on object storage, against a real S3 server (moto, tests/s3_server.py):
checkpoints staged locally and published with a commit object last, keep-last-N in the bucket,
uncommitted steps ignored; a training run whose run_dir is s3:// writes config.yaml,
metrics.jsonl and its checkpoints there, and a crashed one resumes bitwise equal to a run never
interrupted; its export to s3:// is the same SAELens files as a local export."""

from __future__ import annotations

import numpy as np
import jax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from saejax import objstore, paths
from saejax.checkpoint import COMMIT_SUFFIX, Checkpointer


@pytest.fixture
def staging(tmp_path, monkeypatch):
    """Each test stages its s3:// checkpoints under its own tmp_path."""
    path = tmp_path / "staging"
    monkeypatch.setenv("SAEJAX_STAGING_DIR", str(path))
    return path


def _state(seed: int) -> dict:
    mesh = jax.make_mesh((8,), ("model",), devices=jax.devices())
    r = np.random.default_rng(seed)
    return {"w": jax.device_put(r.standard_normal((64, 32), np.float32),
                                NamedSharding(mesh, P(None, "model"))),
            "n": jax.device_put(np.int32(seed), NamedSharding(mesh, P()))}


def _abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def _steps_in(keys: list[str], prefix: str) -> list[str]:
    return sorted({k[len(prefix):].split("/")[0] for k in keys if k.startswith(prefix)})


def test_checkpoints_are_published_with_a_commit_object_last(s3_server, staging):
    url = s3_server.bucket() + "/ck"
    ck = Checkpointer(url, keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"step": step})
    ck.wait()
    ck.close()
    keys = s3_server.keys(url)
    assert _steps_in(keys, "ck/") == ["2", f"2{COMMIT_SUFFIX}", "3", f"3{COMMIT_SUFFIX}"], keys

    # Read back elsewhere (nothing staged): downloaded, verified, bitwise.
    reader = Checkpointer(url, read_only=True)
    assert reader.latest_step() == 3 and sorted(reader.saved_metas()) == [2, 3]
    step, state, meta = reader.restore_latest(_abstract(_state(3)))
    assert step == 3 and meta["step"] == 3
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(3)["w"]))

    # A step uploaded without its commit object (a killed upload) is never listed, and the next
    # training to open the directory deletes it.
    step_3 = objstore.files_under(f"{url}/3")
    objstore.upload_files(staging / url.replace("s3://", "s3/") / "3", f"{url}/9", list(step_3))
    assert Checkpointer(url, read_only=True).latest_step() == 3
    assert Checkpointer(url, read_only=True).restore_latest(_abstract(_state(3)))[0] == 3
    Checkpointer(url).close()
    assert "9" not in _steps_in(s3_server.keys(url), "ck/")


def test_a_damaged_step_falls_back_and_is_set_aside(s3_server, staging):
    import shutil
    import warnings

    from saejax.checkpoint import DAMAGED_SUFFIX

    url = s3_server.bucket() + "/ck"
    ck = Checkpointer(url, keep=3, async_save=False)
    for step in (1, 2):
        ck.save(step, _state(step), {"step": step})
    ck.close()
    files = objstore.files_under(f"{url}/2")
    biggest = paths.as_path(f"{url}/2/{max(files, key=files.get)}")
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the content fingerprint can tell
    biggest.write_bytes(bytes(data))
    shutil.rmtree(staging)  # so the damaged objects are what is read

    ck = Checkpointer(url, keep=3, async_save=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, _, _ = ck.restore_latest(_abstract(_state(1)))
    assert step == 1 and any("step 2" in str(w.message) for w in caught)
    ck.save(3, _state(3), {"step": 3})
    ck.close()
    names = {k.split("/")[1] for k in s3_server.keys(url)}
    assert f"2{DAMAGED_SUFFIX}" in names and f"2{COMMIT_SUFFIX}" not in names, names
    assert Checkpointer(url, read_only=True).latest_step() == 3


def test_what_a_bucket_cannot_do_is_refused_in_one_line(monkeypatch):
    from saejax.checkpoint import STAGING_ENV, check_checkpoint_dir
    from saejax.config import ConfigError, load_config
    from saejax.sweep import split_member

    with pytest.raises(ConfigError, match="train.tensorboard=true needs a local train.run_dir"):
        load_config(None, ["train.tensorboard=true", "train.run_dir=s3://b/run"])
    monkeypatch.delenv(STAGING_ENV, raising=False)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match=f"s3://b/run/checkpoints: .* set {STAGING_ENV}"):
        check_checkpoint_dir("s3://b/run/checkpoints")
    monkeypatch.setenv(STAGING_ENV, "/shared/staging")
    check_checkpoint_dir("s3://b/run/checkpoints")
    assert split_member("s3://b/run") == (paths.as_path("s3://b/run"), None)


# ---------------------------------------------------------------- a training run in a bucket

TRAIN = ["sae.d_in=16", "sae.n_features=32", "data.n_true_features=16", "data.p_active=0.1",
         "train.steps=20", "train.batch_size=64", "train.log_every=5",
         "train.checkpoint_every=5", "train.keep_checkpoints=2", "train.progress=false",
         "resample.at_fractions=[0.5]", "resample.window_steps=5", "resample.n_inputs=256",
         "mesh.data=4", "mesh.model=2"]
CRASH_AT = 10


def _train(run_dir: str) -> None:
    from saejax.config import load_config
    from saejax.data import with_absolute_paths
    from saejax.train.loop import train

    train(with_absolute_paths(load_config(None, [*TRAIN, f"train.run_dir={run_dir}"])),
          quiet=True)


def _final(run_dir: str):
    """(step, TrainState on the host) of a run's newest checkpoint."""
    from saejax.config import Config, from_dict
    from saejax.sharding import make_mesh
    from saejax.train.step import StepContract
    from saejax.typedconfig import read_yaml

    cfg = from_dict(Config, read_yaml(f"{run_dir}/config.yaml", "config"))
    contract = StepContract.build(cfg, make_mesh(cfg.mesh))
    step, state, _ = Checkpointer(f"{run_dir}/checkpoints", read_only=True).restore_latest(
        contract.abstract_state())
    return step, jax.device_get(state)


def _metrics(run_dir: str) -> list[dict]:
    import json

    lines = paths.as_path(f"{run_dir}/metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


# tests/test_object_store_e2e.py does the same through the CLI with a real SIGKILL (default suite)
@pytest.mark.slow
def test_run_in_a_bucket_crashes_resumes_bitwise_and_exports(s3_server, staging, tmp_path,
                                                             monkeypatch):
    import shutil

    from safetensors.numpy import load

    from saejax.export import export_run
    from test_train_e2e import assert_states_bitwise_equal

    ref, bucket = str(tmp_path / "ref"), s3_server.bucket()
    run = f"{bucket}/run"
    _train(ref)

    save = Checkpointer.save

    def save_then_crash(self, step, state, meta):
        save(self, step, state, meta)
        if step == CRASH_AT:
            self.wait()  # committed: what a crash after it leaves
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(run)
    monkeypatch.setattr(Checkpointer, "save", save)
    keys = s3_server.keys(run)
    assert {"run/config.yaml", "run/metrics.jsonl"} <= set(keys), keys
    assert _steps_in(keys, "run/checkpoints/") == [
        "10", f"10{COMMIT_SUFFIX}", "5", f"5{COMMIT_SUFFIX}"], keys
    assert max(r["step"] for r in _metrics(run)) == CRASH_AT

    shutil.rmtree(staging)  # resumed elsewhere: the checkpoint is downloaded
    _train(run)
    step_ref, state_ref = _final(ref)
    step_run, state_run = _final(run)
    assert step_ref == step_run == 20
    assert_states_bitwise_equal(state_run, state_ref)
    assert _metrics(run) == _metrics(ref)
    assert _steps_in(s3_server.keys(run), "run/checkpoints/") == [
        "15", f"15{COMMIT_SUFFIX}", "20", f"20{COMMIT_SUFFIX}"]

    export_run(run, f"{bucket}/export")
    export_run(ref, tmp_path / "export")
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert sorted(p.name for p in paths.as_path(f"{bucket}/export").iterdir()) == names
    got = load(paths.as_path(f"{bucket}/export/sae_weights.safetensors").read_bytes())
    want = load((tmp_path / "export" / "sae_weights.safetensors").read_bytes())
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
