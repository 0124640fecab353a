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
    l1_coefficient: float = 1e-2
    """λ in loss = MSE + λ·Σ|f|, defined on normalised inputs (mean squared norm d_in) whether or
    not the SAE's inputs are scaled, so one λ means the same on any data. With target_l0 > 0
    it is where λ starts; set target_l0=0 to train at this λ (the paper's A/5 used 0.004 on
    unnormalised activations)."""
    l1_warmup_fraction: float = 0.05
    """λ rises linearly from 0 over this fraction of train.steps (Anthropic 2024); 0 = off."""
    target_l0: float = 16.0
    """If > 0, λ is adapted during training (after the warm-up) so that the batch L0 approaches
    this many features per token, starting from l1_coefficient: no λ search by hand (the best λ
    differs between data sets by several times). 0 = a fixed λ."""
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
    k_aux: int = 0
    """Number of dead latents used by the AuxK loss; 0 = d_in/2 (Gao et al.: d_model/2), at most
    half the dictionary."""
    aux_coefficient: float = 1 / 32
    """Weight α of the AuxK loss."""
    dead_tokens_aux: int = 0
    """A latent counts as dead for AuxK when it has not fired in this many tokens; 0 = a tenth of
    the run's tokens, at most 10M (Gao et al.'s window)."""


@dataclass
class JumpReLUConfig:
    """JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope). (section owned by
    saejax/sae/jumprelu.py)"""


@dataclass
class GatedConfig:
    """Gated SAE (Rajamanoharan et al. 2024). (section owned by saejax/sae/gated.py)"""


@dataclass
class BatchTopKConfig:
    """BatchTopK (Bussmann, Leask & Nanda 2024); k and AuxK come from the `topk` section.
    (section owned by saejax/sae/batchtopk.py)"""


@dataclass
class MatryoshkaConfig:
    """Matryoshka BatchTopK (Bussmann et al. 2025); k, AuxK and θ come from the `topk` and
    `batchtopk` sections. (section owned by saejax/sae/matryoshka.py)"""


def k_aux(cfg: "SAEConfig") -> int:
    """The AuxK width in use (`TopKConfig.k_aux`, 0 resolved)."""
    return cfg.topk.k_aux or max(1, min(cfg.d_in // 2, cfg.n_features // 2))


@dataclass
class SAEConfig:
    arch: str = "relu"
    """SAE family (`saejax.sae.FAMILIES`): `relu` (Towards Monosemanticity, L1 penalty) or
    `topk` (Gao et al. 2024). Its options are the section of the same name."""
    d_in: int = 64
    """Width of the input activations (d_model, or d_mlp for MLP activations)."""
    n_features: int = 512
    """Dictionary size F (number of latents)."""
    scale_inputs: bool = True
    """Scale inputs by one scalar so their mean squared norm is d_in (Anthropic 2024); the scalar
    is estimated once from a data sample and folded into the weights on export. Penalties are
    defined on normalised inputs either way."""
    init_b_dec_median: bool = True
    """Initialise b_dec (b_pre for topk) to the geometric median of a data sample (Weiszfeld)."""
    relu: ReluConfig = field(default_factory=ReluConfig)
    topk: TopKConfig = field(default_factory=TopKConfig)
    jumprelu: JumpReLUConfig = field(default_factory=JumpReLUConfig)
    gated: GatedConfig = field(default_factory=GatedConfig)
    batchtopk: BatchTopKConfig = field(default_factory=BatchTopKConfig)
    matryoshka: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)
