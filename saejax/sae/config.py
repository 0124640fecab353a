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
    path: Literal["auto", "dense", "sparse"] = "auto"
    """How the training step computes TopK (same values and gradients): `sparse` keeps the codes
    as k values and indices per token (one encoder product, gathers and scatters of k decoder
    rows; no [B, F] array), `dense` as [B, F] arrays and dense products. `auto` = sparse when
    k/F is small enough for it to be faster on the platform: at most 1/32 on CPU (measured),
    1/512 on GPU/TPU (`saejax.sae.topk.SPARSE_BELOW`). `topk` only: the families that select
    over the batch (batchtopk, matryoshka) stay dense."""


@dataclass
class JumpReLUConfig:
    """JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope): f = z·H(z − θ) with a
    learned threshold θ per feature and the L0 penalty λ·Σ H(z − θ), trained through the paper's
    straight-through estimators (`saejax.sae.jumprelu`). Values are in the paper's units (inputs
    at unit mean squared norm, squared error summed over dimensions), so the paper's numbers
    apply as written. The paper's optimizer is Adam with β1 = 0: set `optim.b1=0` for its recipe.
    (section owned by saejax/sae/jumprelu.py)"""

    l0_coefficient: float = 1e-2
    """λ in loss = ‖x − x̂‖² + λ·L0, the paper's λ (saejax's mean-over-elements MSE on inputs at
    mean squared norm d_in is the same number as the paper's summed error at unit mean squared
    norm). With target_l0 > 0 it is where λ starts; set target_l0=0 to train at this λ."""
    l0_warmup_fraction: float = 0.05
    """λ rises linearly from 0 over this fraction of train.steps (the paper warms λ up); 0 = off."""
    target_l0: float = 16.0
    """If > 0, λ is adapted after the warm-up until the batch L0 approaches this many features
    per token (relu's controller, slowed down: θ follows λ with a lag; not in the paper).
    0 = a fixed λ, as in the paper."""
    threshold_init: float = 1e-3
    """θ₀, every feature's initial threshold, in the paper's units (Gemma Scope: 0.001; saejax
    multiplies by √d_in for its inputs at mean squared norm d_in)."""
    bandwidth: float = 1e-3
    """ε, the width of the rectangle kernel of the straight-through estimators, in the paper's
    units (Gemma Scope: 0.001; × √d_in in saejax's)."""
    apply_b_dec_to_input: bool = True
    """Encode x − b_dec (saejax's other families, SAELens's training default, and the form
    BatchTopK/Matryoshka are evaluated as); false encodes x, as the paper and Gemma Scope do.
    The same function class: b_enc absorbs −W_enc·b_dec."""


@dataclass
class GatedConfig:
    """Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
    Autoencoders"): a gate path decides which features fire, a magnitude path (tied weights)
    how much; the L1 penalty and an auxiliary reconstruction through a frozen decoder train the
    gate (`saejax.sae.gated`). λ is in the paper's units (inputs at unit mean squared norm,
    squared errors summed over dimensions). (section owned by saejax/sae/gated.py)"""

    l1_coefficient: float = 0.3
    """λ in loss = ‖x − x̂‖² + λ·‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen‖², the paper's λ (saejax
    applies λ/√d_in on its inputs at mean squared norm d_in). With target_l0 > 0 it is where λ
    starts; set target_l0=0 to train at this λ."""
    l1_warmup_fraction: float = 0.05
    """λ rises linearly from 0 over this fraction of train.steps; 0 = off."""
    target_l0: float = 16.0
    """If > 0, λ is adapted after the warm-up until the batch L0 approaches this many features
    per token (relu's controller; not in the paper). 0 = a fixed λ, as in the paper."""


@dataclass
class BatchTopKConfig:
    """BatchTopK (Bussmann, Leask & Nanda 2024); k and AuxK come from the `topk` section (k is
    the mean number of active latents per input: B·k over a batch).
    (section owned by saejax/sae/batchtopk.py)"""

    threshold_lr: float = 0.01
    """Rate r of the inference threshold's running average: after each step θ ← (1−r)·θ +
    r·(smallest activation kept in the batch), from θ = 0 (the authors' code; SAELens's
    topk_threshold_lr). Evaluated and exported, the SAE is a JumpReLU with threshold θ."""


@dataclass
class MatryoshkaConfig:
    """Matryoshka BatchTopK (Bussmann et al. 2025); k, AuxK and θ come from the `topk` and
    `batchtopk` sections. (section owned by saejax/sae/matryoshka.py)"""

    widths: list[int] = field(default_factory=list)
    """Nested dictionary sizes m_1 < … < m_n = n_features: the loss sums the MSE of the
    reconstructions from the first m_i latents (+ b_dec) over all i. [] = n_features/16, /8,
    /4, /2 and n_features (the paper's split)."""


def k_aux(cfg: "SAEConfig") -> int:
    """The AuxK width in use (`TopKConfig.k_aux`, 0 resolved)."""
    return cfg.topk.k_aux or max(1, min(cfg.d_in // 2, cfg.n_features // 2))


@dataclass
class SAEConfig:
    arch: str = "relu"
    """SAE family (`saejax.sae.FAMILIES`): `relu` (Towards Monosemanticity, L1 penalty), `topk`
    (Gao et al. 2024), `batchtopk` (Bussmann et al. 2024), `matryoshka` (Matryoshka BatchTopK,
    Bussmann et al. 2025), `jumprelu` (Rajamanoharan et al. 2024; Gemma Scope) or `gated`
    (Rajamanoharan et al. 2024). Its options are the section of the same name (batchtopk and
    matryoshka also read `topk`'s k and AuxK)."""
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
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """`bfloat16`: the big matmuls take bfloat16 inputs (accumulated in float32) and the [B, F]
    codes between them are bfloat16; parameters, Adam moments, losses, norms and metrics stay
    float32 (`saejax.sae.precision` says what and why the drift is bounded). About 2x faster
    on GPUs and TPUs; on CPU usually slower."""
    relu: ReluConfig = field(default_factory=ReluConfig)
    topk: TopKConfig = field(default_factory=TopKConfig)
    jumprelu: JumpReLUConfig = field(default_factory=JumpReLUConfig)
    gated: GatedConfig = field(default_factory=GatedConfig)
    batchtopk: BatchTopKConfig = field(default_factory=BatchTopKConfig)
    matryoshka: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)
