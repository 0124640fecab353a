"""A dictionary trained feature-sharded (mesh.model=8) is exported and evaluated from its
parameters alone, laid out over the devices: its optimizer state is never read and its W_dec is
never whole on one device."""

import jax
import numpy as np

from saejax import checkpoint
from saejax.config import load_config
from saejax.eval.run import evaluate
from saejax.eval.trained import load_sae
from saejax.export import export_run
from saejax.runs import inference_mesh
from saejax.train.loop import train
from tiny_world import D_MLP, SITE

F = 128


def test_feature_sharded_run_exports_and_evaluates(tiny_world, tmp_path, monkeypatch):
    run = tmp_path / "sharded"
    train(load_config(None, [
        "data.source=store", f"data.store_path={tiny_world.store}", f"data.site={SITE}",
        f"sae.d_in={D_MLP}", f"sae.n_features={F}", "sae.relu.l1_coefficient=1e-3",
        "mesh.data=1", "mesh.model=8", "train.steps=20", "train.batch_size=64",
        "train.log_every=10", f"train.run_dir={run}", "train.progress=false",
        "resample.enabled=false"]), quiet=True)

    targets = []
    restore = checkpoint.Checkpointer.restore_latest

    def spy(self, abstract_state, partial=False):
        targets.append((abstract_state, partial))
        return restore(self, abstract_state, partial)

    monkeypatch.setattr(checkpoint.Checkpointer, "restore_latest", spy)
    sae = load_sae(run)
    out = export_run(run, tmp_path / "export")
    result = evaluate([run, out], tiny_world.tokens, contexts="-8:")

    assert len(targets) >= 2
    for target, partial in targets:  # only what inference needs is read, never opt_state
        assert partial and set(target) == {"params", "input_scale", "family_state"}
        assert target["params"]["W_dec"].sharding.shard_shape((F, D_MLP)) == (F // 8, D_MLP)
    w_dec = sae.params["W_dec"]
    assert len(w_dec.sharding.device_set) == 8
    assert {s.data.shape for s in w_dec.addressable_shards} == {(F // 8, D_MLP)}

    # the sharded SAE computes what the same SAE on one device computes
    one = load_sae(run, mesh=inference_mesh(F, jax.devices()[:1]))
    assert len(one.params["W_dec"].sharding.device_set) == 1
    x = np.random.default_rng(0).normal(size=(32, D_MLP)).astype(np.float32)
    np.testing.assert_allclose(sae.encode(sae.params, x), one.encode(one.params, x),
                               rtol=1e-5, atol=1e-5)
    by_name = {r["name"]: r for r in result["saes"]}
    a, b = by_name[run.name], by_name[out.name]
    for key in ("loss_recovered_zero", "l0", "fvu"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=key)
