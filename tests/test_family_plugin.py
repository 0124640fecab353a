"""Adding a family is a change inside saejax/sae/ only: a family registered from this file (with a
parameter of its own, a hyperparameter carried as data and state carried across steps) trains,
checkpoints, resumes exactly, exports and loads back, with no other module knowing of it."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saejax.config import load_config
from saejax.eval.trained import load_sae
from saejax.export import export_run, load_saelens
from saejax.runs import load_params
from saejax.sae import FAMILIES, Family, LossContext
from saejax.sae.base import SAE
from saejax.sae.stats import reconstruction_metrics
from saejax.train.loop import train


class GainSAE(SAE):
    """f = ReLU(pre) · exp(g): a per-feature gain `g`, its own parameter."""

    AXES = {**SAE.AXES, "log_gain": ("d_sae",)}

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs, enc_from_dec=True)
        self.log_gain = self.param("log_gain", jnp.zeros((cfg.n_features,), jnp.float32))

    def encode(self, x):
        return jax.nn.relu(self.pre_activations(x)) * jnp.exp(self.log_gain[...])

    def loss(self, x, ctx: LossContext):
        f = self.encode(x)
        x_hat = self.decode(f)
        metrics = reconstruction_metrics(x, x_hat, self.fired(f))
        loss = metrics["mse"] + ctx.hparams["sparsity"] * jnp.abs(f).sum(-1).mean()
        # state: an exponential moving average of L0, carried across steps and checkpoints
        ema = 0.9 * ctx.state["l0_ema"] + 0.1 * metrics["l0"]
        return loss, {**metrics, "loss": loss, "fired": self.fire_counts(f), "state": {"l0_ema": ema}}


def fold_gain(params, scale):
    """Inputs scaled by s: W_enc·s keeps the codes, W_dec/s and b_dec/s give raw outputs."""
    return {**params, "W_enc": params["W_enc"] * scale, "W_dec": params["W_dec"] / scale,
            "b_dec": params["b_dec"] / scale}


@pytest.fixture
def gain_family(monkeypatch):
    family = Family("gain", GainSAE, hparams=lambda cfg, steps, batch: {"sparsity": 1e-3},
                    init_state=lambda cfg: {"l0_ema": jnp.zeros((), jnp.float32)},
                    saelens_architecture="saejax_gain", fold_input_scale=fold_gain)
    monkeypatch.setitem(FAMILIES, "gain", family)
    return family


def _cfg(run_dir, steps):
    return load_config(None, [
        "sae.arch=gain", "sae.d_in=16", "sae.n_features=64", "sae.scale_inputs=true",
        "data.n_true_features=16", "data.p_active=0.05", "train.batch_size=64",
        f"train.steps={steps}", "train.log_every=5", "train.checkpoint_every=10",
        "optim.lr=1e-2", f"train.run_dir={run_dir}",
        "train.progress=false", "train.async_checkpointing=false"])


def test_registered_family_trains_resumes_exports_and_loads(tmp_path, gain_family):
    summary = train(_cfg(tmp_path / "full", 20), quiet=True)
    assert np.isfinite(summary["fvu"]) and summary["fvu"] < 1.0

    train(_cfg(tmp_path / "split", 20), quiet=True)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "20")  # as if killed after step 10's save
    train(_cfg(tmp_path / "split", 20), quiet=True)  # resumed from 10 to 20
    full, split = load_params(tmp_path / "full"), load_params(tmp_path / "split")
    assert full.step == split.step == 20
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "log_gain"):
        np.testing.assert_array_equal(jax.device_get(split.params[name]),
                                      jax.device_get(full.params[name]), err_msg=name)
    assert float(full.family_state["l0_ema"]) > 0
    assert float(split.family_state["l0_ema"]) == float(full.family_state["l0_ema"])
    assert np.abs(jax.device_get(full.params["log_gain"])).max() > 0  # it trained

    out = export_run(tmp_path / "full", tmp_path / "export")
    tensors, cfg_json = load_saelens(out)
    assert cfg_json["architecture"] == "saejax_gain" and "log_gain" in tensors
    run_sae, exported = load_sae(tmp_path / "full"), load_sae(out)
    assert exported.arch == run_sae.arch == "gain"
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
    f_run, f_exp = run_sae.encode(run_sae.params, x), exported.encode(exported.params, x)
    np.testing.assert_allclose(f_exp, f_run, rtol=1e-5, atol=1e-6)
    assert float(run_sae.fired(run_sae.params, f_run).sum()) > 0
    np.testing.assert_allclose(exported.decode(exported.params, f_exp),
                               run_sae.decode(run_sae.params, f_run), rtol=1e-5, atol=1e-5)
