"""Held-out reconstruction metrics of a trained SAE (the training loop's final summary)."""

from __future__ import annotations

import jax
from flax import nnx

from saejax.sae.base import reconstruction_metrics


def heldout_metrics(graphdef, params: dict, input_scale, x: jax.Array) -> dict:
    """MSE, FVU, L0 on held-out activations x [N, d_in] (raw; scaled like training inputs)."""

    @jax.jit
    def run(params, scale, x):
        xs = x * scale
        sae = nnx.merge(graphdef, params)
        f = sae.encode(xs)
        return reconstruction_metrics(xs, sae.decode(f), f)

    return {k: float(v) for k, v in jax.device_get(run(params, input_scale, x)).items()}

