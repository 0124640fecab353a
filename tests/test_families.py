"""Every registered SAE family passes the same checks (issue 12, "for every family"):

1. the same steps on one device and on a data=2 × model=4 mesh give the same parameters and
   family state to float32 rounding (with a resampling event for families that resample);
2. a run killed after a checkpoint and restarted ends bitwise equal to an uninterrupted one;
3. `jax.vmap` of the pure train step over two states whose hyperparameters differ equals the
   two stepped separately (what sweeps compiled into one step build on);
4. metrics are finite and the firing counts sum to L0·B;
5. the export loads in SAELens, which encodes and decodes as `load_sae` of the run and of the
   folder do, and `saejax eval` gives the same numbers for the run and its export;
6. (slow) the README's setting reaches MMCS >= 0.9 on the synthetic default.

The families are read from `saejax.sae.FAMILIES` at collection time, so a family registered
later runs all of this without editing the file; its tiny settings come from `TINY` (a family
not listed there trains at its section's defaults). Checks share what they can (one compiled
contract per family and mesh, one trained run and one export per family, one `saejax eval` pass
for all): compiling the step still dominates the time."""

from __future__ import annotations

import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import cli
from saejax.checkpoint import Checkpointer
from saejax.config import load_config
from saejax.eval.trained import load_sae
from saejax.export import export_run
from saejax.sae import FAMILIES, get_family
from saejax.sharding import make_mesh
from saejax.train.loop import train
from saejax.train.resample import resample
from saejax.train.step import StepContract, train_step
from tiny_world import D_MLP, SITE

ARCHS = sorted(FAMILIES)
NEWER = [pytest.param(a, marks=pytest.mark.slow) if a == "matryoshka" else a
         for a in ARCHS if a not in ("relu", "topk")]
"""Mesh agreement and kill-and-resume of relu and topk have their own, wider tests
(tests/test_step_sharding.py, tests/test_train_e2e.py, tests/test_topk_model_sharded.py);
matryoshka's selection and state are batchtopk's, so its run of these two is in the slow set."""

SMALL = ["sae.d_in=16", "sae.n_features=64", "train.batch_size=64", "optim.lr=1e-2",
         "train.steps=20", "train.log_every=1",  # each step's fire_count: that step's firings
         "resample.window_steps=2", "resample.n_inputs=1024"]
"""Tiny shapes and fast dead-feature handling, for every family."""

TOPK_TINY = ["sae.topk.k=4", "sae.topk.k_aux=8", "sae.topk.dead_tokens_aux=192"]
"""4 of 64 latents active; AuxK on 8 latents dead for 3 steps (so it acts in the first steps)."""

TINY = {"topk": [*TOPK_TINY, "sae.topk.path=sparse"], "batchtopk": TOPK_TINY,
        "matryoshka": TOPK_TINY}
"""Family-specific settings on top of SMALL; a family not listed runs at its section's defaults
(the penalty families: λ adapted to their default L0 target). TopK takes its sparse path here
(at these sizes `auto` would choose dense, which the older tests cover): vmap, metrics, export
and eval of a sparse-trained run."""

MMCS_SETTINGS = {
    "relu": [],
    "topk": ["sae.topk.k=8"],
    "batchtopk": ["sae.topk.k=8", "sae.topk.aux_coefficient=1", "sae.topk.dead_tokens_aux=20480"],
    "matryoshka": ["sae.n_features=1024", "sae.matryoshka.widths=[512,1024]", "sae.topk.k=8",
                   "sae.topk.aux_coefficient=1", "sae.topk.dead_tokens_aux=20480"],
    "jumprelu": ["sae.n_features=1024", "sae.jumprelu.target_l0=0",
                 "sae.jumprelu.l0_coefficient=0.03"],
    "gated": [],
}
"""Each family's setting for MMCS >= 0.9 on the synthetic default data, as in the README's table
of families (a family not listed is tried at its defaults)."""

STEPS = 10  # steps of the contract-level checks
RESAMPLE_AT = 5  # families that resample do so after this step in the mesh check
N_DEAD = 6  # ... where this many features are made dead from the start
MESH = (2, 4)  # (data, model), against one device (tests/test_step_sharding.py: all meshes)


def small_cfg(arch: str, *more: str):
    return load_config(None, [f"sae.arch={arch}", *SMALL, *TINY.get(arch, []), *more])


def batch(seed: int, n: int = 64, d: int = 16) -> np.ndarray:
    """Non-negative inputs of varied norm (like MLP activations)."""
    rng = np.random.default_rng(seed)
    return (np.maximum(rng.normal(size=(n, d)), 0) * rng.uniform(0.5, 2, size=(n, 1))).astype(
        np.float32)


def contract(cfg, data: int = 1, model: int = 1) -> StepContract:
    cfg.mesh.data, cfg.mesh.model = data, model
    return StepContract.build(cfg, make_mesh(cfg.mesh, devices=jax.devices()[: data * model]))


def small_contract(arch: str, data: int = 1, model: int = 1) -> StepContract:
    """One per family and mesh, so its compiled functions serve every check below."""
    return _small_contract(arch, data, model)


@functools.cache
def _small_contract(arch: str, data: int, model: int) -> StepContract:
    return contract(small_cfg(arch), data, model)


def put(c: StepContract, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, c.batch_sharding)


@functools.cache
def initial(arch: str):
    """A fresh state of the small config, initialised from a data sample on one device: every
    mesh starts from it (sharded initialisation is exercised by the trained run below)."""
    c = small_contract(arch)
    state = c.init(put(c, batch(10**6 + 1, 256)))
    if get_family(arch).resample is None:
        return state
    # A zero encoder column (and zero bias, as initialised) never fires and gets no gradient:
    # a real resampling event at RESAMPLE_AT, whatever the family's training dynamics.
    w_enc = state.params["W_enc"].at[:, :N_DEAD].set(0.0)
    return state.replace(params={**state.params, "W_enc": w_enc})


def fresh(c: StepContract, state):
    """A copy of `state` laid out for `c` (its step donates the state it is given)."""
    copy = jax.tree.map(lambda a: jnp.array(a, copy=True), state)
    return jax.device_put(copy, c.state_shardings)


def steps_on_mesh(arch: str, data: int, model: int):
    """STEPS steps on a data×model mesh (with a resampling event for families that resample):
    (final state on the host, features resampled, each step's (metrics, firings summed over
    features))."""
    c = small_contract(arch, data, model)
    state, n_resampled, per_step = fresh(c, initial(arch)), None, []
    for step in range(STEPS):
        state, m = c.step_fn(state, put(c, batch(step)))
        per_step.append(jax.device_get((m, state.fire_count.sum())))
        if step + 1 == RESAMPLE_AT and get_family(arch).resample is not None:
            state, n_resampled = resample(c, state, [put(c, batch(10**6, 256))])
    return jax.device_get(state), n_resampled, per_step


@functools.cache
def one_device(arch: str):
    """The one-device reference run of `steps_on_mesh` (shared by the checks below)."""
    return steps_on_mesh(arch, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled():
    """The caches above hold compiled steps and device state: free them after this module."""
    yield
    for cached in (_small_contract, initial, one_device):
        cached.cache_clear()


def assert_close(got: dict, want: dict, what: str, rel: float) -> None:
    """Each array of `got` equals `want`'s to `rel` × the array's largest magnitude."""
    assert set(got) == set(want), what
    for k in want:
        a, b = np.asarray(want[k]), np.asarray(got[k])
        scale = max(float(np.abs(a).max(initial=0.0)), 1e-30)
        np.testing.assert_allclose(b, a, rtol=0, atol=rel * scale, err_msg=f"{what}: {k}")


# ---------------------------------------------------------------- 1. meshes


@pytest.mark.parametrize("arch", NEWER)
def test_sharded_training_equal_across_meshes(arch):
    ref, n_ref, _ = one_device(arch)
    got, n, _ = steps_on_mesh(arch, *MESH)
    where = f"{arch} on data={MESH[0]} model={MESH[1]}"
    if get_family(arch).resample is not None:
        assert N_DEAD <= int(n_ref) < 64, f"{arch}: the check must include a resampling event"
        assert int(n) == int(n_ref), where
    assert_close(got.params, ref.params, where, 2e-5)
    assert_close(got.family_state, ref.family_state, f"{where}, family state", 2e-5)
    np.testing.assert_array_equal(got.last_fired, ref.last_fired, err_msg=where)


# ---------------------------------------------------------------- 3. vmap over settings


def doubled(state, arch: str):
    """`state` with the peak LR and every hyperparameter of the family doubled."""
    cfg = small_cfg(arch)
    own = get_family(arch).hparams(cfg.sae, cfg.train.steps, cfg.train.batch_size)
    h = dict(state.hparams)
    for name in ["lr", *own]:
        h[name] = 2 * h[name]
    return state.replace(hparams=h)


# relu, topk and batchtopk also vmap in tests/test_sweep.py (members equal their solo runs).
@pytest.mark.parametrize("arch", [a if a in ("jumprelu", "gated", "matryoshka") else
                                  pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_vmapped_step_equals_separate_steps(arch):
    c = small_contract(arch)
    members = [initial(arch), doubled(initial(arch), arch)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    step = jax.jit(jax.vmap(functools.partial(train_step, graphdef=c.graphdef, cfg=c.cfg,
                                              tx=c.tx), in_axes=(0, None)))
    separate = [fresh(c, m) for m in members]
    for s in range(5):
        x = put(c, batch(s))
        stacked, _ = step(stacked, x)
        separate = [c.step_fn(m, x)[0] for m in separate]
    stacked, separate = jax.device_get((stacked, separate))
    for i, want in enumerate(separate):
        got = jax.tree.map(lambda leaf: leaf[i], stacked)
        assert_close(got.params, want.params, f"{arch} member {i}", 1e-6)
        assert_close(got.family_state, want.family_state, f"{arch} member {i} state", 1e-6)
        np.testing.assert_array_equal(got.last_fired, want.last_fired)
    # the settings matter: the two members trained differently
    assert not np.allclose(separate[0].params["W_dec"], separate[1].params["W_dec"])


# ---------------------------------------------------------------- 4. metrics


@pytest.mark.parametrize("arch", ARCHS)
def test_step_metrics_finite_and_firing_counts_sum_to_l0(arch):
    _, _, per_step = one_device(arch)
    for step, (m, fired) in enumerate(per_step):
        for k in ("loss", "mse", "fvu", "l0"):
            assert np.isfinite(m[k]), (arch, step, k, m[k])
        assert 0 < m["l0"] <= 64, (arch, step, m["l0"])
        assert int(fired) == pytest.approx(m["l0"] * 64, rel=1e-6), (arch, step)


# ---------------------------------------------------------------- the trained run (tiny world)


def run_cfg(arch: str, run_dir, store):
    """20 steps on the tiny world's MLP activations, on a data=2 × model=4 mesh, with
    checkpoints at 10 and 20."""
    return small_cfg(arch, f"sae.d_in={D_MLP}", "data.source=store", f"data.store_path={store}",
                     f"data.site={SITE}", "train.steps=20", "train.log_every=5",
                     "train.checkpoint_every=10", "mesh.data=2", "mesh.model=4",
                     f"train.run_dir={run_dir}", "train.progress=false",
                     "train.async_checkpointing=false")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_world):
    """arch -> (run directory, summary), each family trained once for this module."""
    root, done = tmp_path_factory.mktemp("families"), {}

    def get(arch: str):
        if arch not in done:
            cfg = run_cfg(arch, root / arch, tiny_world.store)
            done[arch] = (root / arch, train(cfg, quiet=True))
        return done[arch]
    return get


def full_state(run_dir, arch: str, store):
    """(step, whole TrainState on the host) of a run's newest checkpoint."""
    c = contract(run_cfg(arch, run_dir, store))
    ck = Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        step, state, _ = ck.restore_latest(c.abstract_state())
    finally:
        ck.close()
    return step, jax.device_get(state)


@pytest.mark.parametrize("arch", ARCHS)
def test_run_metrics_finite(arch, trained):
    run_dir, summary = trained(arch)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "event" not in r and "loss" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    for r in [*logged, summary]:
        assert all(math.isfinite(r[k]) for k in ("mse", "fvu", "l0")), r
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert summary["step"] == 20 and 0 < summary["l0"] and summary["fvu"] < 1.0, summary


# ---------------------------------------------------------------- 2. exact resume


def _slow_but(keep: str, archs) -> list:
    """archs as parameters, all but `keep` marked slow (the default suite's time: one family
    runs each of these checks there, the slow suite all)."""
    return [a if a == keep else pytest.param(a, marks=pytest.mark.slow) for a in archs]


@pytest.mark.parametrize("arch", _slow_but("batchtopk", NEWER))
def test_resume_after_kill_is_bitwise_exact(arch, trained, tiny_world, tmp_path):
    full, _ = trained(arch)
    # A run killed after step 10's checkpoint: the uninterrupted run's directory as it was then.
    split = tmp_path / "split"
    shutil.copytree(full, split)
    shutil.rmtree(split / "checkpoints" / "20")
    train(run_cfg(arch, split, tiny_world.store), quiet=True)  # resumes from 10
    (step_a, a), (step_b, b) = (full_state(d, arch, tiny_world.store) for d in (full, split))
    assert step_a == step_b == 20
    flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(s)[0] for s in (a, b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):  # params, opt state, family state, records
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x),
                                      err_msg=f"{arch} {jax.tree_util.keystr(path)}")


# ---------------------------------------------------------------- 5. export and evaluation


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    """arch -> the SAELens export of its trained run, made once (skips a family with no SAELens
    architecture)."""
    root, done = tmp_path_factory.mktemp("saelens"), {}

    def get(arch: str):
        if get_family(arch).saelens_architecture is None:
            pytest.skip(f"{arch} has no SAELens architecture")
        if arch not in done:
            done[arch] = export_run(trained(arch)[0], root / arch)
        return done[arch]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_saelens_and_encodes_alike(arch, trained, exports):
    sae_lens = pytest.importorskip("sae_lens")
    torch = pytest.importorskip("torch")
    run_dir, folder = trained(arch)[0], exports(arch)
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    x = np.abs(np.random.default_rng(3).normal(size=(64, D_MLP))).astype(np.float32)
    with torch.no_grad():
        f_theirs = theirs.encode(torch.from_numpy(x))
        x_hat_theirs = theirs.decode(f_theirs).numpy()
        f_theirs = f_theirs.numpy()
    for sae in (load_sae(run_dir), load_sae(folder)):
        f = np.asarray(sae.encode(sae.params, jnp.asarray(x)))
        np.testing.assert_allclose(f, f_theirs, rtol=1e-5, atol=1e-5 * np.abs(f_theirs).max(),
                                   err_msg=f"{arch} codes of {sae.source}")
        x_hat = np.asarray(sae.decode(sae.params, jnp.asarray(f)))
        np.testing.assert_allclose(x_hat, x_hat_theirs, rtol=1e-5,
                                   atol=1e-5 * np.abs(x_hat_theirs).max(),
                                   err_msg=f"{arch} reconstruction of {sae.source}")
        fired = np.asarray(sae.fired(sae.params, jnp.asarray(f)))
        assert 0 < fired.sum() and (fired == (f_theirs != 0)).all(), arch


@pytest.fixture(scope="module")
def evaluated(trained, exports, tiny_world, tmp_path_factory):
    """`saejax eval` once over every family's run and export (one LM pass for all of them is
    much cheaper than one per family): arch -> its [run, export] results, or the exception that
    kept the family out (its test reports it; the others are still evaluated)."""
    paths, broken = {}, {}
    for arch in ARCHS:
        try:
            paths[arch] = [trained(arch)[0]]
            if get_family(arch).saelens_architecture is not None:
                paths[arch].append(exports(arch))
        except Exception as e:  # noqa: BLE001 (re-raised by the family's own test)
            broken[arch] = e
            paths.pop(arch)
    out = tmp_path_factory.mktemp("eval")
    args = [str(p) for ps in paths.values() for p in ps]
    assert cli.main(["eval", *args, "--tokens", str(tiny_world.tokens), "--contexts=-20:",
                     "--out", str(out)]) == 0
    results = iter(json.loads((out / "eval.json").read_text())["saes"])
    return {**{arch: [next(results) for _ in ps] for arch, ps in paths.items()}, **broken}


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_eval_on_run_and_export(arch, evaluated):
    results = evaluated[arch]
    if isinstance(results, Exception):
        raise results
    for r in results:
        assert all(math.isfinite(r[k]) for k in ("loss", "kl", "l0", "fvu")), r
    run, export = results[0], results[-1]  # the same SAE in two formats (when it exports)
    for k in ("loss", "kl", "l0", "fvu", "dead"):
        assert export[k] == pytest.approx(run[k], rel=1e-5, abs=1e-7), (arch, k)


# ---------------------------------------------------------------- 6. ground truth (slow)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_reaches_mmcs_on_synthetic_default(arch, tmp_path):
    """The embedded default run (`saejax train`: 512 true features in 64 dims, 512 latents,
    6,000 steps of 1,024) with the family's README setting recovers the true features."""
    cfg = load_config(None, [f"sae.arch={arch}", *MMCS_SETTINGS.get(arch, []),
                             f"train.run_dir={tmp_path}", "train.progress=false"])
    summary = train(cfg, quiet=True)
    assert summary["mmcs"] >= 0.9, (arch, summary)
