"""The JumpReLU and Gated SAE losses and their gradients, transcribed from the papers' equations
into float64 numpy by hand (forward and backward written out; no autodiff, no saejax).

Both in the papers' units: inputs x [B, d] at about unit mean squared norm, squared errors
summed over the d dimensions, every term averaged over the batch.

JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead", sections 3-4):
    z = W_enc x + b_enc   (x − b_dec with apply_b_dec)      f = z·H(z − θ)      x̂ = W_dec f + b_dec
    L = ‖x − x̂‖² + λ Σ_i H(z_i − θ_i)
    pseudo-derivatives, K(u) = 1{|u| < ½}:
        ð f/ð θ = −(θ/ε) K((z − θ)/ε),   ð H(z − θ)/ð θ = −(1/ε) K((z − θ)/ε),
        ∂f/∂z = H(z − θ),                ∂H(z − θ)/∂z = 0.

Gated (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs", section 3):
    x̄ = x − b_dec;  π_gate = W_gate x̄ + b_gate;  π_mag = (exp(r_mag) ⊙ W_gate) x̄ + b_mag
    f = 1[π_gate > 0] ⊙ ReLU(π_mag);   x̂ = W_dec f + b_dec
    L = ‖x − x̂‖² + λ ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖²
    x̂_frozen: the decoder with W_dec, b_dec held fixed (no gradient).
    `frozen=False` and `norm_weighted=True` give SAELens's variants (live decoder in the
    auxiliary term; L1 weighted by decoder-row norms) so tests can name the differences.

Layouts are SAELens's: W_enc/W_gate [d, F], W_dec [F, d].
"""

import numpy as np


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def rectangle(u):
    return (np.abs(u) < 0.5).astype(np.float64)


def jumprelu(x, W_enc, b_enc, W_dec, b_dec, theta, lam, eps, apply_b_dec=False):
    """Loss terms and gradients (wrt W_enc, b_enc, W_dec, b_dec, theta) of a JumpReLU SAE."""
    x, W_enc, b_enc, W_dec, b_dec, theta = _f64(x, W_enc, b_enc, W_dec, b_dec, theta)
    B = x.shape[0]
    xin = x - b_dec if apply_b_dec else x
    z = xin @ W_enc + b_enc
    on = (z > theta).astype(np.float64)
    f = z * on
    x_hat = f @ W_dec + b_dec
    err = x_hat - x
    mse = np.sum(err**2) / B
    l0 = on.sum(axis=1).mean()
    loss = mse + lam * l0

    d_xhat = 2 * err / B
    g_W_dec = f.T @ d_xhat
    g_b_dec = d_xhat.sum(axis=0)
    d_f = d_xhat @ W_dec.T
    kernel = rectangle((z - theta) / eps) / eps
    g_theta = np.sum(d_f * -(theta * kernel), axis=0)        # through the JumpReLU
    g_theta += np.sum((lam / B) * -kernel, axis=0)            # through the L0 step
    d_z = d_f * on
    g_W_enc = xin.T @ d_z
    g_b_enc = d_z.sum(axis=0)
    if apply_b_dec:
        g_b_dec = g_b_dec - d_z.sum(axis=0) @ W_enc.T
    grads = {"W_enc": g_W_enc, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec,
             "theta": g_theta}
    return {"loss": loss, "mse": mse, "l0": l0, "sparsity": lam * l0, "z": z, "f": f,
            "x_hat": x_hat, "grads": grads}


def gated(x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, lam, frozen=True, norm_weighted=False):
    """Loss terms and gradients (wrt W_gate, b_gate, r_mag, b_mag, W_dec, b_dec) of a Gated SAE."""
    x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec = _f64(x, W_gate, b_gate, r_mag, b_mag, W_dec,
                                                         b_dec)
    B = x.shape[0]
    xbar = x - b_dec
    W_mag = W_gate * np.exp(r_mag)
    pi_gate = xbar @ W_gate + b_gate
    pi_mag = xbar @ W_mag + b_mag
    gate_on = (pi_gate > 0).astype(np.float64)
    mag_on = (pi_mag > 0).astype(np.float64)
    f = gate_on * np.maximum(pi_mag, 0)
    x_hat = f @ W_dec + b_dec
    err = x_hat - x
    a = np.maximum(pi_gate, 0)
    norms = np.linalg.norm(W_dec, axis=1) if norm_weighted else np.ones(W_dec.shape[0])
    aux_err = a @ W_dec + b_dec - x
    mse = np.sum(err**2) / B
    l1 = np.sum(a * norms) / B
    aux = np.sum(aux_err**2) / B
    loss = mse + lam * l1 + aux

    # reconstruction: decoder and magnitude path
    d_xhat = 2 * err / B
    g_W_dec = f.T @ d_xhat
    g_b_dec = d_xhat.sum(axis=0)
    d_pi_mag = (d_xhat @ W_dec.T) * gate_on * mag_on
    # sparsity and auxiliary terms: gate path
    d_aux = 2 * aux_err / B
    d_a = lam * norms / B + d_aux @ W_dec.T
    d_pi_gate = d_a * (pi_gate > 0)
    if norm_weighted:
        g_W_dec += (lam / B) * a.sum(axis=0)[:, None] * W_dec / norms[:, None]
    if not frozen:
        g_W_dec += a.T @ d_aux
        g_b_dec += d_aux.sum(axis=0)
    # both paths share W_gate and x̄
    d_u = d_pi_gate + d_pi_mag * np.exp(r_mag)
    g_W_gate = xbar.T @ d_u
    g_r_mag = np.sum(d_pi_mag * (xbar @ W_gate) * np.exp(r_mag), axis=0)
    g_b_dec = g_b_dec - d_u.sum(axis=0) @ W_gate.T
    grads = {"W_enc": g_W_gate, "b_gate": d_pi_gate.sum(axis=0), "r_mag": g_r_mag,
             "b_mag": d_pi_mag.sum(axis=0), "W_dec": g_W_dec, "b_dec": g_b_dec}
    return {"loss": loss, "mse": mse, "l1": l1, "aux": aux, "f": f, "x_hat": x_hat,
            "pi_gate": pi_gate, "pi_mag": pi_mag, "grads": grads}
