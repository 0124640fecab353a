"""The SAE's configuration: fields every family shares, and one nested section per family.

    sae.arch=topk sae.n_features=4096 sae.topk.k=32      # dotted overrides
    sae: {arch: relu, relu: {l1_coefficient: 4e-3}}      # YAML

Only the section named by `arch` is used; the others keep their defaults. A family's section is
declared here beside the others and named in its record (`saejax.sae.family.Family.options`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ReluConfig:
    l1_coefficient: float = 4e-3
    """λ in loss = MSE + λ·Σ|f| (the paper's A/5 used 0.004)."""
    l1_warmup_steps: int = 0
    """λ rises linearly from 0 over this many steps (Anthropic 2024 recipe); 0 = off."""
    decoder_norm: Literal["unit", "l1_weighted"] = "unit"
    """`unit` keeps decoder rows at unit norm (grad parallel to each row removed before the
    optimizer step, rows renormalised after); `l1_weighted` leaves them free and weights each
    feature's L1 term by its decoder-row norm (Anthropic 2024)."""
    init_enc_from_dec: bool = False
    """Initialise W_enc as W_decᵀ (Anthropic 2024)."""


@dataclass
class TopKConfig:
    k: int = 32
    """Number of active latents per token."""
    k_aux: int = 256
    """Number of dead latents used by the AuxK loss (Gao et al.: d_model/2 or 256)."""
    aux_coefficient: float = 1 / 32
    """Weight α of the AuxK loss."""
    dead_tokens_aux: int = 10_000_000
    """A latent counts as dead for AuxK when it has not fired in this many tokens."""


@dataclass
class SAEConfig:
    arch: str = "relu"
    """SAE family (`saejax.sae.FAMILIES`): `relu` (Towards Monosemanticity, L1 penalty) or
    `topk` (Gao et al. 2024). Its options are the section of the same name."""
    d_in: int = 64
    """Width of the input activations (d_model, or d_mlp for MLP activations)."""
    n_features: int = 512
    """Dictionary size F (number of latents)."""
    scale_inputs: bool = False
    """Scale inputs by one scalar so their mean squared norm is d_in (Anthropic 2024); the scalar
    is estimated once from a data sample and folded into the weights on export."""
    init_b_dec_median: bool = True
    """Initialise b_dec (b_pre for topk) to the geometric median of a data sample (Weiszfeld)."""
    relu: ReluConfig = field(default_factory=ReluConfig)
    topk: TopKConfig = field(default_factory=TopKConfig)
