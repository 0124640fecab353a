"""SAELens StandardSAE/TopKSAE encode and decode in numpy: the reference the export tests (and
the end-to-end export test) compare against, written from SAELens's source."""

import numpy as np


ARCHITECTURES = ("standard", "topk")


def _check_supported(cfg: dict) -> None:
    if cfg["architecture"] not in ARCHITECTURES:
        raise NotImplementedError(f"architecture {cfg['architecture']!r} (only {ARCHITECTURES})")
    if cfg.get("normalize_activations", "none") != "none":
        raise NotImplementedError(
            f"normalize_activations={cfg['normalize_activations']!r} (only 'none')")


def _rescale(params: dict, cfg: dict) -> np.ndarray | None:
    """Decoder row norms when a topk SAE has rescale_acts_by_decoder_norm, else None."""
    if cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        return np.linalg.norm(params["W_dec"], axis=-1)
    return None


def saelens_encode(params, cfg, x: np.ndarray) -> np.ndarray:
    """SAELens StandardSAE/TopKSAE .encode in numpy (x [..., d_in] -> f [..., d_sae]).

    Inputs are already flat: SAELens's reshape_activations="hook_z" head flattening is not done.
    """
    _check_supported(cfg)
    x = np.asarray(x, np.float32)
    if cfg.get("apply_b_dec_to_input", True):
        x = x - params["b_dec"]
    pre = x @ params["W_enc"] + params["b_enc"]
    if cfg["architecture"] == "standard":
        return np.maximum(pre, 0)
    norms = _rescale(params, cfg)
    if norms is not None:
        pre = pre * norms
    k = int(cfg["k"])
    idx = np.argpartition(-pre, k - 1, axis=-1)[..., :k]
    f = np.zeros_like(pre)
    np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, axis=-1), 0), axis=-1)
    return f


def saelens_decode(params, cfg, f) -> np.ndarray:
    """SAELens StandardSAE/TopKSAE .decode in numpy (f [..., d_sae] -> x_hat [..., d_in])."""
    _check_supported(cfg)
    f = np.asarray(f, np.float32)
    norms = _rescale(params, cfg)
    if norms is not None:
        f = f / norms
    return f @ params["W_dec"] + params["b_dec"]
