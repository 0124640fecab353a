"""The neuron basis as an SAE: the paper's baseline through the same analysis tools.

An identity "SAE" (W_enc = W_dec = I, zero biases, ReLU) has one feature per neuron whose
activation is the neuron's own value, so analysis, script features, auto-interpretability and
the browser treat MLP neurons exactly like SAE features. Exact for non-negative sites (a ReLU
MLP's `mlp.hook_post`); on a signed site it shows each neuron's positive part only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from saejax.export import export_saelens


def export_neuron_basis(lm_path: str | os.PathLike, site: str, d: int,
                        out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the identity SAE of `site` (width d) of the LM at lm_path as a SAELens folder."""
    eye = np.eye(d, dtype=np.float32)
    zeros = np.zeros(d, np.float32)
    params = {"W_enc": eye, "b_enc": zeros, "W_dec": eye, "b_dec": zeros}
    return export_saelens(out_dir, params, architecture="standard", overwrite=overwrite,
                          metadata={"model_name": str(lm_path), "hook_name": site,
                                    "saejax_neuron_basis": True})
