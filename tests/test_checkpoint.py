"""Checkpointer: sharded round trips, restore onto other meshes, keep-last-N, damage detection
and fallback, and a process killed mid-save."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from saejax.checkpoint import CheckpointError, Checkpointer, fingerprint
from saejax.errors import StorageError

from fs_faults import file_size_limit

REPO = Path(__file__).resolve().parents[1]

# When one array of a damaged checkpoint fails to read, Orbax abandons the other reads' coroutines;
# their GeneratorExit surfaces as "unraisable" noise at some later garbage collection.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
    yield
    gc.collect()  # here, under the filter above, rather than at interpreter exit


@struct.dataclass
class State:
    params: dict
    opt: dict
    step: jax.Array
    rng: jax.Array


def mesh_of(shape):
    n = shape[0] * shape[1]
    return jax.make_mesh(shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:n])


def shardings(mesh) -> State:
    s = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    return State(params={"W_enc": s(None, "model"), "W_dec": s("model", None), "b": s("model")},
                 opt={"mu": s("data", "model"), "count": s()},
                 step=s(), rng=s())


def host_state(seed=0) -> State:
    r = np.random.default_rng(seed)
    return State(
        # Shards over 1 KiB are stored out of line in OCDBT data files, as in a real run; smaller
        # ones sit inline in the CRC-checked b-tree nodes.
        params={"W_enc": r.standard_normal((64, 256), np.float32),
                "W_dec": r.standard_normal((256, 64)).astype(jnp.bfloat16),
                "b": r.standard_normal(256, np.float32)},
        opt={"mu": r.standard_normal((64, 256), np.float32), "count": np.int32(seed + 7)},
        step=np.int32(100 + seed),
        rng=np.asarray(jax.random.key_data(jax.random.key(seed))),  # uint32 [2]
    )


def make_state(mesh, seed=0) -> State:
    return jax.tree.map(jax.device_put, host_state(seed), shardings(mesh))


def abstract(mesh) -> State:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        host_state(), shardings(mesh))


def bits(x) -> np.ndarray:
    x = np.asarray(jax.device_get(x))
    return x.reshape(-1).view(np.uint8)


def assert_bitwise_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=jax.tree_util.keystr(path))


def saved(tmp_path, steps=(1, 2), keep=3, mesh=(2, 4)) -> tuple[Checkpointer, dict]:
    """A checkpointer with one checkpoint per step (state seeded by the step), all committed."""
    ck = Checkpointer(tmp_path, keep=keep)
    states = {s: make_state(mesh_of(mesh), seed=s) for s in steps}
    for s in steps:
        ck.save(s, states[s], {"step": s})
    ck.wait()
    return ck, states


def restore_warns(ck, target) -> tuple[tuple, list[str]]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = ck.restore_latest(target)
    return out, [str(x.message) for x in w if str(x.message).startswith("checkpoint step")]


def data_files(step_dir: Path) -> list[Path]:
    """The state's OCDBT data files (`state/**/d/*`), biggest first: the biggest holds the
    out-of-line array chunks."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, list(step_dir.rglob("*"))
    return sorted(files, key=lambda p: -p.stat().st_size)


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_sharded_bitwise_and_meta(tmp_path, async_save):
    mesh = mesh_of((2, 4))
    state = make_state(mesh)
    meta = {"config": {"sae": {"arch": "topk", "k": 32}, "lr": 3e-4, "dims": [1, 2]},
            "data_position": 12345, "note": None}
    ck = Checkpointer(tmp_path, async_save=async_save)
    ck.save(7, state, meta)
    ck.wait()
    step, got, got_meta = ck.restore_latest(abstract(mesh))
    assert step == 7 and got_meta == meta
    assert_bitwise_equal(state, got)
    for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(shardings(mesh))):
        assert x.sharding == s
    assert got.rng.dtype == jnp.uint32 and got.step.dtype == jnp.int32
    ck.close()


@pytest.mark.parametrize("shape", [(4, 2), (1, 1)])
def test_restore_onto_other_mesh(tmp_path, shape):
    ck, states = saved(tmp_path, steps=(3,))
    target = abstract(mesh_of(shape))
    step, got, _ = ck.restore_latest(target)
    assert step == 3
    assert_bitwise_equal(states[3], got)
    for x, t in zip(jax.tree.leaves(got), jax.tree.leaves(target)):
        assert x.sharding == t.sharding
    ck.close()


def test_fingerprint_independent_of_sharding_and_sensitive_to_order():
    a = make_state(mesh_of((2, 4)))
    b = jax.tree.map(jax.device_put, a, shardings(mesh_of((1, 1))))
    assert fingerprint(a) == fingerprint(b)
    w = a.params["W_enc"]
    swapped = a.replace(params={**a.params, "W_enc": w[:, ::-1]})  # same values, other order
    changed = fingerprint(swapped)
    assert changed["params/W_enc"][0] == fingerprint(a)["params/W_enc"][0]
    assert changed != fingerprint(a)


def test_empty_dir_is_none(tmp_path):
    assert Checkpointer(tmp_path / "new").restore_latest(abstract(mesh_of((2, 4)))) is None


def test_keep_last_n(tmp_path):
    ck, _ = saved(tmp_path, steps=(1, 2, 3, 4, 5), keep=2)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 5]
    assert ck.latest_step() == 5
    assert ck.restore_latest(abstract(mesh_of((2, 4))))[0] == 5


def _flip_bytes(step_dir: Path):
    f = data_files(step_dir)[0]
    b = bytearray(f.read_bytes())
    for i in range(len(b) // 3, len(b) // 3 + 8):  # inside the compressed payload: still decodes
        b[i] ^= 0x5A
    f.write_bytes(bytes(b))


def _truncate(step_dir: Path):
    f = data_files(step_dir)[0]
    os.truncate(f, f.stat().st_size // 2)


def _delete(step_dir: Path):
    data_files(step_dir)[0].unlink()


def _delete_meta(step_dir: Path):
    (step_dir / "meta" / "metadata").unlink()


def _edit_meta(step_dir: Path):
    f = step_dir / "meta" / "metadata"
    meta = json.loads(f.read_text())
    meta["step"] = 99
    f.write_text(json.dumps(meta))


def _swap_state(step_dir: Path):
    """Another checkpoint's state under this one's meta: readable, but not what was saved."""
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "1" / "state", step_dir / "state")


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate, _delete, _delete_meta, _edit_meta,
                                    _swap_state])
def test_damaged_newest_falls_back(tmp_path, damage):
    ck, states = saved(tmp_path, steps=(1, 2))
    damage(tmp_path / "2")
    (step, got, meta), msgs = restore_warns(ck, abstract(mesh_of((4, 2))))
    assert (step, meta) == (1, {"step": 1})
    assert_bitwise_equal(states[1], got)
    assert len(msgs) == 1 and "step 2" in msgs[0] and "damaged (" in msgs[0], msgs


def test_silent_byte_change_is_caught_by_fingerprint(tmp_path):
    ck, _ = saved(tmp_path, steps=(1, 2))
    _flip_bytes(tmp_path / "2")
    _, msgs = restore_warns(ck, abstract(mesh_of((2, 4))))
    assert "fingerprint mismatch" in msgs[0], msgs  # Orbax itself read it back without error


def test_all_damaged_raises(tmp_path):
    ck, _ = saved(tmp_path, steps=(1, 2))
    _truncate(tmp_path / "1")
    _flip_bytes(tmp_path / "2")
    with pytest.raises(CheckpointError, match="no checkpoint .* restores: step 2: .*; step 1: "):
        restore_warns(ck, abstract(mesh_of((2, 4))))


def test_resume_past_damaged_step_saves_it_again(tmp_path):
    """Resuming from step 1 and re-reaching step 2 must not collide with the damaged step 2."""
    ck, states = saved(tmp_path, steps=(1, 2))
    _truncate(tmp_path / "2")
    restore_warns(ck, abstract(mesh_of((2, 4))))
    ck.save(2, states[2], {"step": 2})
    ck.wait()
    assert (tmp_path / "2.damaged").is_dir()
    fresh = Checkpointer(tmp_path)
    assert fresh._mngr.all_steps() == [1, 2]  # the moved-aside copy is not taken for a step
    step, got, _ = fresh.restore_latest(abstract(mesh_of((2, 4))))
    assert step == 2
    assert_bitwise_equal(states[2], got)


KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from saejax.checkpoint import Checkpointer

    ck = Checkpointer(sys.argv[1])
    ck.save(1, {"w": jnp.arange(1000.0)}, {"step": 1})
    ck.wait()

    async def die(*args, **kwargs):  # the commit rename: everything else is already written
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.async_path.rename = die
    ck.save(2, {"w": jnp.arange(1000.0) + 1}, {"step": 2})
    ck.wait()
""")


def test_killed_mid_save_leaves_previous_usable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers and not (tmp_path / "2").exists(), sorted(os.listdir(tmp_path))

    ck = Checkpointer(tmp_path)
    target = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32,
                                        sharding=NamedSharding(mesh_of((1, 1)), P()))}
    step, got, meta = ck.restore_latest(target)
    assert (step, meta) == (1, {"step": 1})
    np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(1000.0))
    ck.save(2, {"w": got["w"] + 1}, {"step": 2})  # the leftover does not block saving step 2
    ck.wait()
    assert not any(".orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir())
    assert ck.restore_latest(target)[0] == 2


def test_cli_reports_a_run_with_no_good_checkpoint(tmp_path, capsys):
    """Every checkpoint damaged: the command exits 4 naming the damage, not with a traceback."""
    from saejax import cli

    run = tmp_path / "run"
    assert cli.main(["train", "--quiet", "sae.n_features=64", "sae.d_in=16",
                     "data.n_true_features=32", "train.steps=4", "train.batch_size=64",
                     "train.checkpoint_every=2", "train.log_every=2", "train.progress=false",
                     f"train.run_dir={run}"]) == 0
    for step_dir in (run / "checkpoints").iterdir():
        for f in data_files(step_dir):
            os.truncate(f, f.stat().st_size // 2)
    capsys.readouterr()
    assert cli.main(["export", str(run), str(tmp_path / "out")]) == 4
    err = capsys.readouterr().err
    assert "checkpoint error" in err and "step 4" in err, err
    assert not (tmp_path / "out").exists()


def test_read_only_creates_cleans_and_saves_nothing(tmp_path):
    assert Checkpointer(tmp_path / "none", read_only=True).restore_latest(
        abstract(mesh_of((2, 4)))) is None
    assert not (tmp_path / "none").exists()
    saved(tmp_path, steps=(1,))
    (tmp_path / "2.orbax-checkpoint-tmp").mkdir()  # a save in progress in another process
    ck = Checkpointer(tmp_path, read_only=True)
    assert ck.restore_latest(abstract(mesh_of((1, 1))))[0] == 1
    assert (tmp_path / "2.orbax-checkpoint-tmp").is_dir()
    with pytest.raises(RuntimeError, match="read-only"):
        ck.save(3, make_state(mesh_of((1, 1))), {})


def test_saved_metas_without_reading_arrays(tmp_path):
    saved(tmp_path, steps=(1, 2, 3))
    _truncate(tmp_path / "3")  # the arrays: the metas are still intact
    _edit_meta(tmp_path / "2")
    assert Checkpointer(tmp_path, read_only=True).saved_metas() == {3: {"step": 3}, 1: {"step": 1}}
    _delete_meta(tmp_path / "1")
    _delete_meta(tmp_path / "3")
    with pytest.raises(CheckpointError, match="no checkpoint .* restores: step 3: .*step 1: "):
        Checkpointer(tmp_path, read_only=True).saved_metas()


@pytest.mark.parametrize("async_save", [True, False])
def test_failing_write_is_one_storage_error(tmp_path, async_save):
    """A write that fails inside Orbax (here: past the file-size limit) is one StorageError
    naming the OS error and the last committed step, which still restores."""
    ck, states = saved(tmp_path, steps=(1,))
    ck = Checkpointer(tmp_path, async_save=async_save)
    with file_size_limit(2000), pytest.raises(
            StorageError, match=r"cannot write a checkpoint in .*: File too large \(errno 27\); "
                                r"last good checkpoint: step 1; rerun the same command"):
        ck.save(2, states[1], {"step": 2})
        ck.wait()
    step, got, _ = Checkpointer(tmp_path, read_only=True).restore_latest(abstract(mesh_of((2, 4))))
    assert step == 1
    assert_bitwise_equal(states[1], got)


def test_no_room_is_refused_before_writing(tmp_path, monkeypatch):
    ck, states = saved(tmp_path, steps=(1,))
    monkeypatch.setattr("saejax.checkpoint.free_space", lambda path: 100)
    with pytest.raises(StorageError, match=r"No space left on device \(a checkpoint needs about "
                                           r"[\d.]+ MiB, 9.54e-05 MiB are free\); last good "
                                           r"checkpoint: step 1"):
        ck.save(2, states[1], {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
