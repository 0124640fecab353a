"""SAELens export: folding the input scale, cfg.json contents, errors, and round trips."""

import json

import numpy as np
import pytest

from saejax.export import CFG_FILENAME, WEIGHTS_FILENAME, export_saelens, load_saelens
from saelens_numpy import saelens_decode, saelens_encode

D_IN, D_SAE, K, SCALE = 16, 48, 5, 3.7


def topk(k):
    """The topk family's SAELens options (`Family.saelens_options`)."""
    return {"k": k, "rescale_acts_by_decoder_norm": False}


def random_params(seed=0, d_in=D_IN, d_sae=D_SAE):
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "b_enc": rng.normal(scale=0.3, size=d_sae).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_dec": rng.normal(size=d_in).astype(np.float32),
    }


def reference(params, x, architecture, k, s):
    """The saejax SAE on scaled inputs, in float64, mapped back to raw units."""
    p = {n: v.astype(np.float64) for n, v in params.items()}
    pre = (s * x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if architecture == "topk":
        keep = np.argsort(-pre, axis=-1)[:, :k]
        mask = np.zeros_like(pre, bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        pre = np.where(mask, pre, 0.0)
    f = np.maximum(pre, 0.0)
    return f, (f @ p["W_dec"] + p["b_dec"]) / s


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", K)])
def test_round_trip_matches_scaled_original(tmp_path, architecture, k):
    params = random_params()
    x = np.random.default_rng(1).normal(size=(32, D_IN)) / SCALE  # raw units
    out = export_saelens(tmp_path / "sae", params, architecture=architecture,
                         options=topk(k) if k else None,
                         input_scale=SCALE, metadata={"model_name": "gpt2"})
    loaded, cfg = load_saelens(out)
    f = saelens_encode(loaded, cfg, x)
    x_hat = saelens_decode(loaded, cfg, f)
    f_ref, x_hat_ref = reference(params, x, architecture, k, SCALE)
    np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_hat, x_hat_ref, rtol=1e-4, atol=1e-4)
    if architecture == "topk":
        assert ((f > 0).sum(-1) <= K).all() and ((f > 0).sum(-1) > 0).any()
    # the fold itself
    np.testing.assert_allclose(loaded["W_enc"], SCALE * params["W_enc"], rtol=1e-6)
    np.testing.assert_allclose(loaded["W_dec"], params["W_dec"] / SCALE, rtol=1e-6)
    np.testing.assert_allclose(loaded["b_dec"], params["b_dec"] / SCALE, rtol=1e-6)
    np.testing.assert_array_equal(loaded["b_enc"], params["b_enc"])


def test_exactly_two_files_and_no_temp_left(tmp_path):
    export_saelens(tmp_path / "sae", random_params(), architecture="standard")
    files = sorted(p.name for p in (tmp_path / "sae").iterdir())
    assert files == sorted([WEIGHTS_FILENAME, CFG_FILENAME])
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_cfg_json_fields(tmp_path):
    meta = {"model_name": "gpt2", "hook_name": "blocks.6.hook_resid_post", "context_size": 128,
            "dataset": "org/tokens", "saejax_step": 1000}
    out = export_saelens(tmp_path / "sae", random_params(), architecture="topk", options=topk(K),
                         input_scale=SCALE, metadata=meta)
    cfg = json.loads((out / CFG_FILENAME).read_text())
    # SAELens 6 SAEConfig / TopKSAEConfig fields
    assert cfg["architecture"] == "topk" and cfg["k"] == K
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    assert cfg["reshape_activations"] == "none"
    assert cfg["rescale_acts_by_decoder_norm"] is False
    m = cfg["metadata"]
    assert m["model_name"] == "gpt2" and m["hook_name"] == "blocks.6.hook_resid_post"
    assert m["context_size"] == 128 and m["dataset_path"] == "org/tokens"
    assert m["sae_lens_version"].startswith("6.") and m["prepend_bos"] is True
    assert "saejax_step" not in m  # unknown keys stay out of SAELens's metadata...
    assert cfg["saejax"] == {"input_scale_folded": SCALE, "saejax_step": 1000}  # ...and land here
    # flat SAELens <= 5.x mirror
    assert cfg["hook_name"] == "blocks.6.hook_resid_post" and cfg["hook_layer"] == 6
    assert cfg["activation_fn_str"] == "topk" and cfg["activation_fn_kwargs"] == {"k": K}


def test_cfg_standard_defaults_and_dtype(tmp_path):
    out = export_saelens(tmp_path / "sae", random_params(), architecture="standard",
                         dtype="float16")
    params, cfg = load_saelens(out)
    assert "k" not in cfg and cfg["activation_fn_str"] == "relu"
    assert cfg["dtype"] == "float16" and cfg["metadata"]["model_name"] is None
    assert all(v.dtype == np.float32 for v in params.values())


@pytest.mark.parametrize("name,shape", [("W_enc", (D_IN, D_SAE + 1)), ("b_enc", (D_SAE + 1,)),
                                        ("W_dec", (D_IN, D_SAE)), ("b_dec", (D_IN, 1))])
def test_shape_errors_name_the_array(tmp_path, name, shape):
    params = random_params()
    params[name] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=name):
        export_saelens(tmp_path / "sae", params, architecture="standard")
    assert not any(tmp_path.iterdir())


def test_argument_errors(tmp_path):
    p = random_params()
    with pytest.raises(ValueError, match="missing"):
        export_saelens(tmp_path / "a", {"W_enc": p["W_enc"]}, architecture="standard")
    with pytest.raises(ValueError, match="k"):
        export_saelens(tmp_path / "a", p, architecture="topk")
    with pytest.raises(ValueError, match="k"):
        export_saelens(tmp_path / "a", p, architecture="topk", options=topk(D_SAE + 1))
    with pytest.raises(ValueError, match=r"\['k'\] are not options of architecture 'standard'"):
        export_saelens(tmp_path / "a", p, architecture="standard", options={"k": 3})
    with pytest.raises(ValueError, match="architecture"):
        export_saelens(tmp_path / "a", p, architecture="nope")
    with pytest.raises(ValueError, match="input_scale"):
        export_saelens(tmp_path / "a", p, architecture="standard", input_scale=0.0)
    with pytest.raises(ValueError, match="b_dec.*NaN"):
        export_saelens(tmp_path / "a", {**p, "b_dec": p["b_dec"] * np.nan},
                       architecture="standard")


def test_existing_dir_needs_overwrite(tmp_path):
    out = export_saelens(tmp_path / "sae", random_params(0), architecture="standard")
    with pytest.raises(FileExistsError):
        export_saelens(out, random_params(1), architecture="standard")
    export_saelens(out, random_params(1), architecture="topk", options=topk(K), overwrite=True)
    params, cfg = load_saelens(out)
    assert cfg["architecture"] == "topk"
    np.testing.assert_array_equal(params["b_enc"], random_params(1)["b_enc"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=CFG_FILENAME):
        load_saelens(tmp_path)
    out = export_saelens(tmp_path / "sae", random_params(), architecture="standard")
    (out / WEIGHTS_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME):
        load_saelens(out)
    out = export_saelens(tmp_path / "sae2", random_params(), architecture="standard")
    cfg = json.loads((out / CFG_FILENAME).read_text())
    (out / CFG_FILENAME).write_text(json.dumps({**cfg, "d_sae": D_SAE + 1}))
    with pytest.raises(ValueError, match="d_sae"):
        load_saelens(out)
    del cfg["d_in"]
    (out / CFG_FILENAME).write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match="d_in"):
        load_saelens(out)


def test_load_old_flat_cfg(tmp_path):
    """A SAELens < 6 flat cfg (k inside activation_fn_kwargs) still loads and encodes."""
    out = export_saelens(tmp_path / "sae", random_params(), architecture="topk", options=topk(K))
    old = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
           "hook_point": "blocks.0.hook_resid_pre", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": K}, "normalize_activations": False,
           "sae_lens_training_version": "3.0.0"}
    (out / CFG_FILENAME).write_text(json.dumps(old))
    params, cfg = load_saelens(out)
    assert cfg["k"] == K and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_pre"
    f = saelens_encode(params, cfg, np.ones((2, D_IN), np.float32))
    assert ((f > 0).sum(-1) <= K).all()


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", K)])
def test_loads_in_saelens_itself(tmp_path, architecture, k):
    sae_lens = pytest.importorskip("sae_lens")
    torch = pytest.importorskip("torch")
    out = export_saelens(tmp_path / "sae", random_params(), architecture=architecture,
                         options=topk(k) if k else None,
                         input_scale=SCALE)
    sae = sae_lens.SAE.load_from_disk(str(out))
    params, cfg = load_saelens(out)
    x = np.random.default_rng(2).normal(size=(8, D_IN)).astype(np.float32)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x))
        x_hat = sae.decode(f)
    np.testing.assert_allclose(f.numpy(), saelens_encode(params, cfg, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat.numpy(), saelens_decode(params, cfg, f.numpy()),
                               rtol=1e-5, atol=1e-5)
