"""Matryoshka BatchTopK (Bussmann et al. 2025): the nested loss, gradients and threshold against a
float64 numpy transcription of the paper (tests/ref_batchtopk.py) and against SAELens's
MatryoshkaBatchTopKTrainingSAE; the widths' checks. Selection, θ, the inference form, resume and
export are BatchTopK's (tests/test_family_batchtopk.py); tests/test_families.py runs the checks
every family shares (meshes, resume, vmap, export, eval) on this one too."""

import numpy as np
import pytest

from saejax.config import load_config
from saejax.errors import ConfigError
from saejax.sae.matryoshka import widths as resolved_widths
from test_family_batchtopk import (ALPHA, D, F, K, assert_matches_reference, close, codes,
                                   context, dead_mask, random_batch, random_params, sae_cfg,
                                   saejax_loss, saelens_outputs, saelens_training_sae)

WIDTHS = (8, 24, 64)


def test_crafted_nested_loss():
    """One input, every latent kept, W_enc = W_dec = I: the loss is the sum of the MSEs of the
    reconstructions from the first 1, 2 and 4 latents."""
    cfg = sae_cfg("matryoshka", d=4, n=4, k=4, widths=(1, 2, 4))
    eye = np.eye(4)
    params = {"W_enc": eye, "b_enc": np.zeros(4), "W_dec": eye, "b_dec": np.zeros(4)}
    x = np.array([[2.0, 1.0, 0.5, 0.25]])
    loss, aux, _ = saejax_loss(cfg, params, x, context(cfg))
    by_hand = (1 + 0.25 + 0.0625) / 4 + (0.25 + 0.0625) / 4 + 0.0
    assert loss == pytest.approx(by_hand, rel=1e-6) and aux["mse"] == 0.0
    assert_matches_reference(cfg, params, x, widths=(1, 2, 4))


@pytest.mark.parametrize("widths", [WIDTHS, ()])
def test_loss_gradients_and_threshold_equal_the_paper(widths):
    """Random weights and inputs, a quarter of the latents dead: every term, gradient and θ equal
    the numpy float64 transcription, for given widths and the default (F/16 … F)."""
    cfg = sae_cfg("matryoshka", widths=widths)
    levels = resolved_widths(cfg)
    assert levels == (widths or (4, 8, 16, 32, 64))
    assert_matches_reference(cfg, random_params(5), random_batch(6), dead=dead_mask(16),
                             theta=0.2, widths=levels)


def test_equals_saelens_matryoshka_training_sae():
    """SAELens's MatryoshkaBatchTopKTrainingSAE with the same weights and batches: codes, each
    level's MSE, the loss and gradients (SAELens sums squared errors over d_in: d_in × saejax's)
    and topk_threshold over two steps."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)

    params = random_params(7)
    params["b_enc"] = np.where(dead_mask(16), 4.0, params["b_enc"])  # see the BatchTopK test
    cfg = sae_cfg("matryoshka", widths=WIDTHS)
    sae = saelens_training_sae(MatryoshkaBatchTopKTrainingSAE,
                               MatryoshkaBatchTopKTrainingSAEConfig, params, k=K,
                               matryoshka_widths=list(WIDTHS))
    theta = 0.0
    for step in range(2):
        x, dead = random_batch(30 + step), dead_mask(16)
        loss, aux, grads = saejax_loss(cfg, params, x, context(cfg, dead, theta))
        want = [np.mean((x - r) ** 2) for r in _levels(params, codes(cfg, params, x))]
        out, their_grads = saelens_outputs(sae, x, dead)
        close(out.feature_acts.detach().numpy(), codes(cfg, params, x), "codes")
        for width, mse in zip(WIDTHS[:-1], want):
            close(out.losses[f"inner_mse_loss_{width}"].item(), D * mse, f"MSE of {width}")
        close(out.losses["mse_loss"].item(), D * aux["mse"], "MSE of the full width")
        close(out.losses["auxiliary_reconstruction_loss"].item(), D * ALPHA * aux["aux_loss"],
              "AuxK")
        close(out.loss.item(), D * loss, "loss")
        for name, g in grads.items():
            close(their_grads[name], D * g, f"d loss / d {name}", 2e-5)
        theta = float(aux["state"]["threshold"])
        assert theta == pytest.approx(sae.topk_threshold.item(), rel=1e-6)


def _levels(params, f):
    """Reconstructions from the first m latents, each width of WIDTHS (float64)."""
    return [f[:, :m] @ params["W_dec"][:m] + params["b_dec"] for m in WIDTHS]


def test_widths_checked_naming_the_field():
    base = ["sae.arch=matryoshka", f"sae.n_features={F}", f"sae.d_in={D}"]
    for widths, message in [("[16,8,64]", "strictly increasing"), ("[8,8,64]", "strictly"),
                            ("[8,16,32]", "must end at sae.n_features=64"),
                            ("[0,64]", r"sae\.matryoshka\.widths\[0\]")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, f"sae.matryoshka.widths={widths}"])
    with pytest.raises(ConfigError, match=r"sae\.topk\.k"):
        load_config(None, [*base, "sae.topk.k=65"])
    cfg = load_config(None, [*base, "sae.matryoshka.widths=[8,64]"])
    assert resolved_widths(cfg.sae) == (8, 64)
    assert resolved_widths(load_config(None, ["sae.arch=matryoshka"]).sae) == (
        32, 64, 128, 256, 512)
