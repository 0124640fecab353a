"""BatchTopK (Bussmann, Leask & Nanda 2024): the global top B·k selection, the loss, gradients
and threshold against a float64 numpy transcription of the paper (tests/ref_batchtopk.py) and
against SAELens's BatchTopKTrainingSAE, θ through checkpoints and export, and the same
parameters on any mesh. (tests/test_families.py runs the checks every family shares.)"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import ref_batchtopk as ref
from saejax.config import Config, load_config, validate
from saejax.errors import ConfigError
from saejax.sae import LossContext, get_family
from saejax.sae.batchtopk import batch_top_k_mask
from saejax.sae.config import MatryoshkaConfig, SAEConfig, TopKConfig

D, F, B, K, K_AUX = 16, 64, 64, 4, 8
ALPHA = 1 / 32


# ---------------------------------------------------------------- helpers (matryoshka's too)


def sae_cfg(arch: str, d: int = D, n: int = F, k: int = K, widths=()) -> SAEConfig:
    return SAEConfig(arch=arch, d_in=d, n_features=n, topk=TopKConfig(k=k, k_aux=min(K_AUX, n)),
                     matryoshka=MatryoshkaConfig(list(widths)))


def random_params(seed: int, d: int = D, n: int = F) -> dict:
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(n, d))
    return {"W_enc": rng.normal(size=(d, n)) / np.sqrt(d), "b_enc": 0.1 * rng.normal(size=n),
            "W_dec": w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True),
            "b_dec": 0.1 * rng.normal(size=d)}


def random_batch(seed: int, b: int = B, d: int = D) -> np.ndarray:
    """Non-negative inputs of varied norm (like MLP activations)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(b, d)), 0) * rng.uniform(0.5, 2, size=(b, 1))


def context(cfg: SAEConfig, dead=None, theta: float = 0.0) -> LossContext:
    """The loss's inputs for a 100-step run of batch B: α = 1/32, θ's rate 0.01, the latents in
    `dead` not fired for longer than AuxK's window."""
    family = get_family(cfg.arch)
    hparams = {k: jnp.float32(v) for k, v in family.hparams(cfg, 100, B).items()}
    dead = np.zeros(cfg.n_features, bool) if dead is None else dead
    since = jnp.where(jnp.asarray(dead), 10**6, 0).astype(jnp.int32)
    return LossContext(0, hparams, since, {"threshold": jnp.float32(theta)})


@functools.cache
def _compiled(arch: str, d: int, n: int, k: int, widths: tuple):
    """(loss, aux), its gradients and the codes f, jitted once per configuration (the inputs
    as data)."""
    graphdef = get_family(arch).graphdef(sae_cfg(arch, d, n, k, widths))

    def run(p, x, hparams, since, state):
        ctx = LossContext(0, hparams, since, state)
        out = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(x, ctx), has_aux=True)(p)
        return out, nnx.merge(graphdef, p).encode(x)

    return jax.jit(run)


def _run(cfg: SAEConfig, params: dict, x: np.ndarray, ctx: LossContext):
    key = cfg.arch, cfg.d_in, cfg.n_features, cfg.topk.k, tuple(cfg.matryoshka.widths)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    return jax.device_get(_compiled(*key)(p, jnp.asarray(x, jnp.float32), ctx.hparams,
                                          ctx.steps_since_fired, ctx.state))


def saejax_loss(cfg: SAEConfig, params: dict, x: np.ndarray, ctx: LossContext):
    """(loss, aux, grads) of the family's loss, as the train step takes them."""
    ((value, aux), grads), _ = _run(cfg, params, x, ctx)
    return float(value), aux, grads


def codes(cfg: SAEConfig, params: dict, x: np.ndarray) -> np.ndarray:
    """The codes f of the batch x (the training rule)."""
    return np.asarray(_run(cfg, params, x, context(cfg))[1])


def close(got, want, what: str, rel: float = 1e-5) -> None:
    """got equals want to `rel` of want's largest magnitude."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                               atol=rel * max(np.abs(want).max(initial=0), 1e-30), err_msg=what)


def assert_matches_reference(cfg, params, x, *, dead=None, theta=0.0, widths=None):
    loss, aux, grads = saejax_loss(cfg, params, x, context(cfg, dead, theta))
    want = ref.forward_backward(params, x, k=cfg.topk.k, widths=widths, dead=dead,
                                k_aux=K_AUX, alpha=ALPHA, theta=theta)
    close(loss, want["loss"], "loss")
    close(aux["aux_loss"], want["aux_loss"], "AuxK")
    close(aux["state"]["threshold"], want["threshold"], "θ")
    close(codes(cfg, params, x), want["f"], "f")
    for name, g in want["grads"].items():
        close(grads[name], g, f"d loss / d {name}")
    return want


def saelens_outputs(sae, x: np.ndarray, dead: np.ndarray | None):
    """SAELens's training forward on batch x: (output, grads as numpy); grads zeroed after."""
    from sae_lens.saes.sae import TrainStepInput

    torch = pytest.importorskip("torch")
    step_in = TrainStepInput(sae_in=torch.from_numpy(x.astype(np.float32)), coefficients={},
                             dead_neuron_mask=None if dead is None else torch.from_numpy(dead),
                             n_training_steps=0, is_logging_step=False)
    out = sae.training_forward_pass(step_in)
    out.loss.backward()
    grads = {n: getattr(sae, n).grad.numpy().copy() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sae.zero_grad()
    return out, grads


def saelens_training_sae(cls, config_cls, params: dict, **options):
    """SAELens's training class with saejax's weights; its options as saejax trains (decoder
    rows not rescaled: saejax keeps them at unit norm instead), float32 on CPU."""
    torch = pytest.importorskip("torch")
    cfg = config_cls(d_in=params["W_enc"].shape[0], d_sae=params["W_enc"].shape[1],
                     aux_loss_coefficient=ALPHA, rescale_acts_by_decoder_norm=False,
                     decoder_init_norm=None, dtype="float32", device="cpu", **options)
    sae = cls(cfg)
    with torch.no_grad():
        for name, value in params.items():
            getattr(sae, name).copy_(torch.from_numpy(np.asarray(value, np.float32)))
    return sae


def dead_mask(n_dead: int, n: int = F) -> np.ndarray:
    return np.arange(n) % (n // n_dead) == 0


# ---------------------------------------------------------------- the selection


def test_selection_is_the_global_top_b_k():
    """Against numpy's stable sort of the flattened batch (lax.top_k's order), with ties
    (duplicate rows, rounded values) and with fewer than B·k positive entries; and unchanged by
    the sharding."""
    rng = np.random.default_rng(0)
    select = jax.jit(batch_top_k_mask)
    b, f = 8, 24
    for trial in range(12):
        a = np.maximum(rng.normal(size=(b, f)), 0).astype(np.float32)
        if trial % 3 == 0:
            a[b // 2:] = a[: b - b // 2]  # duplicate rows: ties at every value
        if trial % 3 == 1:
            a = np.round(a, 1)
        n = int(rng.integers(1, b * f + 1))
        got, positive = np.asarray(select(jnp.asarray(a), n)), a > 0
        np.testing.assert_array_equal(got & positive, ref.batch_top_k(a, n) & positive,
                                      err_msg=str(trial))
        if positive.sum() >= n:
            assert got.sum() == n, trial

    a = np.maximum(rng.normal(size=(64, 64)), 0).astype(np.float32)
    a[32:] = a[:32]
    mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices()[:8],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = jax.device_put(a, NamedSharding(mesh, PartitionSpec("data", "model")))
    np.testing.assert_array_equal(np.asarray(select(sharded, 256)), ref.batch_top_k(a, 256))


def test_crafted_batch_keeps_the_batch_largest_not_each_rows():
    """B=2, k=1: both kept activations come from the first input (per-row TopK would keep one
    in each), and a negative pre-activation is never kept."""
    cfg = sae_cfg("batchtopk", d=3, n=3, k=1)
    params = {"W_enc": np.eye(3), "b_enc": np.zeros(3), "W_dec": np.eye(3), "b_dec": np.zeros(3)}
    x = np.array([[3.0, 2.0, -1.0], [0.5, 0.1, 0.2]])  # pre-activations = x
    want = assert_matches_reference(cfg, params, x, theta=0.5)
    np.testing.assert_array_equal(want["f"], [[3.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    _, aux, _ = saejax_loss(cfg, params, x, context(cfg, theta=0.5))
    assert aux["l0"] == 1.0 and aux["threshold"] == pytest.approx(0.99 * 0.5 + 0.01 * 2.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_gradients_and_threshold_equal_the_paper(seed):
    """Random weights and inputs, a quarter of the latents dead (AuxK active): every term, every
    gradient and θ's update equal the numpy float64 transcription."""
    cfg = sae_cfg("batchtopk")
    assert_matches_reference(cfg, random_params(seed), random_batch(seed + 10),
                             dead=dead_mask(16), theta=0.3)


def test_equals_saelens_batchtopk_training_sae():
    """SAELens's BatchTopKTrainingSAE with the same weights and batches: the codes, loss and
    gradients (SAELens sums the squared error over d_in: d_in × saejax's) and its topk_threshold
    over three steps. Where it deviates from the paper: its AuxK is scaled by min(#dead/k_aux, 1)
    (here: #dead = 4 < k_aux = d_in/2 = 8 halves it), saejax's is not."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    params = random_params(2)
    # the dead latents' pre-activations positive, so the AuxK terms agree (SAELens does not
    # ReLU them; the paper's authors and saejax do)
    params["b_enc"] = np.where(dead_mask(16), 4.0, params["b_enc"])
    cfg = sae_cfg("batchtopk")
    sae = saelens_training_sae(BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, params, k=K)
    theta = 0.0
    for step in range(3):
        x = random_batch(20 + step)
        dead = dead_mask(16) if step < 2 else dead_mask(4)
        ctx = context(cfg, dead, theta)
        loss, aux, grads = saejax_loss(cfg, params, x, ctx)
        out, their_grads = saelens_outputs(sae, x, dead)
        close(out.feature_acts.detach().numpy(), codes(cfg, params, x), "codes")
        close(out.losses["mse_loss"].item(), D * aux["mse"], "MSE")
        scale = min(dead.sum() / (D // 2), 1.0)  # SAELens's deviation
        close(out.losses["auxiliary_reconstruction_loss"].item(),
              scale * D * ALPHA * aux["aux_loss"], "AuxK")
        if scale == 1:
            close(out.loss.item(), D * loss, "loss")
            for name, g in grads.items():
                close(their_grads[name], D * g, f"d loss / d {name}", 2e-5)
        theta = float(aux["state"]["threshold"])
        assert theta == pytest.approx(sae.topk_threshold.item(), rel=1e-6)
    assert theta > 0


# ---------------------------------------------------------------- inference form


def test_inference_is_jumprelu_with_theta_and_folds():
    """For evaluation and export the SAE is a JumpReLU with θ on every latent: ReLU(pre)·[pre > θ];
    folding an input scale s into it gives the same codes on raw inputs x/s."""
    cfg, params = sae_cfg("batchtopk"), random_params(3)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    family = get_family("batchtopk")
    jcfg, jparams = family.for_inference(cfg, params, {"threshold": jnp.float32(0.4)})
    assert jcfg.arch == "jumprelu" and (jcfg.d_in, jcfg.n_features) == (D, F)
    np.testing.assert_allclose(np.exp(jparams["log_threshold"]), np.full(F, 0.4), rtol=1e-6)
    x = random_batch(4).astype(np.float32)
    jumprelu = get_family("jumprelu")
    f = np.asarray(nnx.merge(jumprelu.graphdef(jcfg), jparams).encode(jnp.asarray(x)))
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    close(f, np.where(pre > 0.4, pre, 0), "JumpReLU codes")
    folded = jumprelu.fold_input_scale(jparams, 2.5)
    f_raw = nnx.merge(jumprelu.graphdef(jcfg), folded).encode(jnp.asarray(x / 2.5))
    close(f_raw, f, "codes after folding the input scale")
    _, never_trained = family.for_inference(cfg, params, {"threshold": jnp.float32(0)})
    assert np.isfinite(never_trained["log_threshold"]).all()


# ---------------------------------------------------------------- a trained run


def run_cfg(run_dir, steps=10):
    """10 steps on synthetic data (16 true features in 16 dimensions), 64 latents."""
    return load_config(None, [
        "sae.arch=batchtopk", "sae.d_in=16", "sae.n_features=64", "sae.topk.k=4",
        "sae.topk.k_aux=8", "data.n_true_features=16", "data.p_active=0.1",
        "train.batch_size=64", f"train.steps={steps}", "train.log_every=5",
        "train.checkpoint_every=10", "optim.lr=1e-2", f"train.run_dir={run_dir}",
        "train.progress=false", "train.async_checkpointing=false"])


@pytest.mark.slow  # tests/test_families.py covers it for every family
def test_threshold_checkpointed_and_exported(tmp_path):
    """θ is family state: it is in the checkpoint and the metrics report it, and the SAELens export
    (a JumpReLU with θ on every latent) loads in SAELens and encodes/decodes as saejax's own loader
    of the run. (That a resumed run continues θ bit for bit is tests/test_families.py's resume
    check, which compares every leaf of the state, θ included.)"""
    from saejax.eval.trained import load_sae
    from saejax.export import export_run
    from saejax.runs import load_params
    from saejax.train.loop import train

    sae_lens = pytest.importorskip("sae_lens")
    torch = pytest.importorskip("torch")
    train(run_cfg(tmp_path / "full"), quiet=True)
    full = load_params(tmp_path / "full")
    theta = float(full.family_state["threshold"])
    assert full.step == 10 and theta > 0
    logged = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().split("\n")
              if r and '"threshold"' in r]
    assert logged[-1]["step"] == 10 and logged[-1]["threshold"] == pytest.approx(theta, rel=1e-6)

    folder = export_run(tmp_path / "full", tmp_path / "export")
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "jumprelu"
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    np.testing.assert_allclose(theirs.threshold.detach().numpy(), np.full(64, theta), rtol=1e-6)
    ours = load_sae(tmp_path / "full")
    x = (np.abs(np.random.default_rng(5).normal(size=(64, 16))) / full.input_scale).astype(
        np.float32)  # raw inputs, at the training data's scale
    with torch.no_grad():
        f_theirs = theirs.encode(torch.from_numpy(x))
        x_hat_theirs = theirs.decode(f_theirs).numpy()
    f = np.asarray(ours.encode(ours.params, jnp.asarray(x)))
    assert (f > 0).sum() > 0
    close(f, f_theirs.numpy(), "codes")
    close(ours.decode(ours.params, jnp.asarray(f)), x_hat_theirs, "reconstruction")


# ---------------------------------------------------------------- meshes


def train_on_mesh(arch: str, data: int, model: int, steps: int = 8, **sae):
    """(state, largest AuxK loss) after `steps` steps on a data×model mesh."""
    from saejax.sharding import make_mesh
    from saejax.train.step import StepContract

    cfg = Config()
    cfg.sae = sae_cfg(arch, **sae)
    cfg.sae.topk.dead_tokens_aux = B  # AuxK on the latents that did not fire in the last step
    cfg.train.batch_size, cfg.train.steps, cfg.optim.lr = B, steps, 1e-2
    cfg.mesh.data, cfg.mesh.model = data, model
    c = StepContract.build(cfg, make_mesh(cfg.mesh, devices=jax.devices()[: data * model]))
    state = c.init(jax.device_put(random_batch(10**6, 256).astype(np.float32), c.batch_sharding))
    aux = []
    for step in range(steps):
        x = jax.device_put(random_batch(step).astype(np.float32), c.batch_sharding)
        state, metrics = c.step_fn(state, x)
        aux.append(metrics["aux_loss"])
    return jax.device_get(state), float(max(aux))


def assert_same_run(got, want, where: str) -> None:
    for k in want.params:
        close(got.params[k], want.params[k], f"{k} on {where}", 2e-5)
    close(got.family_state["threshold"], want.family_state["threshold"], f"θ on {where}", 2e-5)
    np.testing.assert_array_equal(got.last_fired, want.last_fired, err_msg=where)


@pytest.mark.slow  # tests/test_families.py covers it for every family
def test_meshes_agree():
    """The selection is the global top B·k: 1 device and data = 4 train the same parameters and θ
    (tests/test_families.py adds data 8, model 8 and data 2 × model 4 for every family)."""
    want, aux = train_on_mesh("batchtopk", 1, 1)
    assert float(want.family_state["threshold"]) > 0 and aux > 0
    for data, model in [(4, 1)]:
        assert_same_run(train_on_mesh("batchtopk", data, model)[0], want,
                        f"data={data} model={model}")


# ---------------------------------------------------------------- config


def test_config_rejects_bad_settings():
    for changes, field in [(["sae.topk.k=65"], "sae.topk.k"),
                           (["sae.batchtopk.threshold_lr=0"], "sae.batchtopk.threshold_lr"),
                           (["sae.batchtopk.threshold_lr=1.5"], "sae.batchtopk.threshold_lr")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate(load_config(None, ["sae.arch=batchtopk", "sae.n_features=64", *changes]))
