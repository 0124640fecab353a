"""BatchTopK (Bussmann, Leask & Nanda 2024) and Matryoshka BatchTopK (Bussmann et al. 2025) in
numpy float64: the papers' equations with Gao et al.'s AuxK, the gradients derived by hand, and
the threshold's update. The reference tests/test_family_batchtopk.py and
tests/test_family_matryoshka.py hold saejax to; written from the papers, not from saejax.

    x̄ = x − b_dec;  pre = x̄ W_enc + b_enc;  a = ReLU(pre)
    f = a on the B·k largest entries of a over the whole batch (M), 0 elsewhere
    x̂_m = f[:, :m] W_dec[:m] + b_dec  for each width m (BatchTopK: the one width F)
    loss = Σ_m mean((x̂_m − x)²) + α · mean((g W_dec − e)²)
        e = x − x̂_F (held fixed), g = a on each row's k_aux largest dead latents (G)
    θ' = (1 − r)·θ + r · min{f > 0}
"""

import numpy as np


def batch_top_k(a: np.ndarray, n: int) -> np.ndarray:
    """bool mask of the n largest entries of a over the whole array (ties: lower flat index)."""
    mask = np.zeros(a.size, bool)
    mask[np.argsort(-a.ravel(), kind="stable")[:n]] = True
    return mask.reshape(a.shape)


def dead_top_k(a: np.ndarray, dead: np.ndarray, k_aux: int) -> np.ndarray:
    """bool mask of each row's min(k_aux, #dead) largest entries among the dead latents."""
    n = min(k_aux, int(dead.sum()))
    idx = np.argsort(-np.where(dead, a, -np.inf), axis=1, kind="stable")[:, :n]
    mask = np.zeros(a.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def forward_backward(params: dict, x: np.ndarray, *, k: int, widths=None, dead=None,
                     k_aux: int = 1, alpha: float = 0.0, theta: float = 0.0,
                     rate: float = 0.01) -> dict:
    """loss, its terms, f, x̂ (full width), θ' and d loss / d parameter, all float64."""
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    x = np.asarray(x, np.float64)
    W_enc, b_enc, W_dec, b_dec = p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]
    B, d = x.shape
    widths = list(widths or [W_enc.shape[1]])

    xc = x - b_dec
    pre = xc @ W_enc + b_enc
    a = np.maximum(pre, 0)
    M = batch_top_k(a, B * k)
    f = a * M

    mse_terms, dW_dec, df, db_dec = [], np.zeros_like(W_dec), np.zeros_like(f), np.zeros(d)
    for m in widths:
        x_hat = f[:, :m] @ W_dec[:m] + b_dec
        r = x_hat - x
        mse_terms.append(np.mean(r**2))
        R = 2 * r / (B * d)  # d mean(r²) / d x̂_m
        dW_dec[:m] += f[:, :m].T @ R
        df[:, :m] += R @ W_dec[:m].T
        db_dec += R.sum(0)
    dpre = df * M * (pre > 0)

    aux = 0.0
    if dead is not None and np.any(dead):
        G = dead_top_k(a, np.asarray(dead, bool), k_aux)
        g = a * G
        e = x - x_hat
        e_hat = g @ W_dec
        aux = np.mean((e_hat - e) ** 2)
        Q = 2 * alpha * (e_hat - e) / (B * d)
        dW_dec += g.T @ Q
        dpre = dpre + (Q @ W_dec.T) * G * (pre > 0)

    positive = f[f > 0]
    grads = {"W_enc": xc.T @ dpre, "b_enc": dpre.sum(0), "W_dec": dW_dec,
             "b_dec": db_dec - W_enc @ dpre.sum(0)}
    return {"loss": sum(mse_terms) + alpha * aux, "mse_terms": mse_terms, "aux_loss": aux,
            "f": f, "x_hat": x_hat, "grads": grads,
            "threshold": (1 - rate) * theta + rate * positive.min() if positive.size else theta}
