"""Typed run configuration: nested dataclasses, YAML files, dotted overrides, validation.

Every field is documented where it is declared. `load_config(path, overrides)` builds a `Config`
from defaults <- YAML <- `a.b=value` overrides and rejects unknown keys, wrong types and
impossible combinations before any compute, with a message naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from saejax import typedconfig
from saejax.errors import ConfigError
from saejax.paths import is_url
from saejax.sae.config import SAEConfig
from saejax.sae.family import FAMILIES, get_family
# The generic machinery, used through this module by the trainers and the CLI.
from saejax.typedconfig import (check_same_run, flatten, from_dict,  # noqa: F401
                                load_dataclass, parse_override, save_config, to_dict)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate of Adam (the default suits the embedded synthetic problem; dictionaries
    of 10^4+ features on LM activations usually want 1e-4 to 5e-4)."""
    b1: float = 0.9
    """Adam β1."""
    b2: float = 0.999
    """Adam β2."""
    eps: float = 1e-8
    """Adam ε."""
    warmup_steps: int = 0
    """Linear LR warm-up from 0 over this many steps."""
    decay: Literal["constant", "linear", "cosine"] = "linear"
    """LR shape after warm-up, down to 0 at the last step for `linear`/`cosine`."""
    grad_clip: float = 0.0
    """Clip gradients to this global norm; 0 = off."""


@dataclass
class ResampleConfig:
    enabled: bool = True
    """Resample dead features (Towards Monosemanticity procedure), for families that resample
    (relu; topk has AuxK instead)."""
    at_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """Resample at these fractions of train.steps (so every run resamples, whatever its
    length); [] = at `steps` instead."""
    steps: list[int] = field(default_factory=list)
    """Resample at these absolute steps when at_fractions is [] (the paper: 25k, 50k, 75k,
    100k of ~1M)."""
    window_steps: int = 0
    """A feature is dead if it has not fired in any of this many previous steps; 0 = an eighth
    of train.steps (the paper's 12,500: half the spacing of its resampling events)."""
    n_inputs: int = 131_072
    """Inputs on which the loss is computed to pick replacements, streamed in chunks (memory
    does not grow with it; time does: the paper used 819,200)."""
    enc_scale: float = 0.2
    """New encoder row norm = enc_scale × mean norm of the alive features' encoder rows."""


@dataclass
class MeshConfig:
    data: int = -1
    """Devices along the `data` axis (batch). -1 = all devices not used by `model` and `sae`."""
    model: int = 1
    """Devices along the `model` axis (the dictionary/feature dimension)."""
    sae: int = 1
    """Devices along the `sae` axis: a sweep's members are spread over it (each device holds
    1/sae of every group's members; the batch is replicated over it)."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "npy", "store", "lm"] = "synthetic"
    """Where activations come from: generated ground truth, .npy files, an activation store
    harvested from a language model (`saejax.data.store`), or `lm`: a language model run during
    training into an on-device shuffle buffer (`saejax.data.onthefly`, no disk)."""
    n_true_features: int = 512
    """synthetic: number of ground-truth feature directions."""
    p_active: float = 0.01
    """synthetic: probability that a ground-truth feature is active in a vector."""
    correlated_groups: int = 0
    """synthetic: partition features into this many co-activating groups; 0 = independent."""
    paths: list[str] = field(default_factory=list)
    """npy: .npy files (or glob patterns) of [N, d_in] activations."""
    store_path: str = ""
    """store: directory of an activation store."""
    site: str = ""
    """store: hook site to train on, e.g. blocks.0.mlp.hook_post ("" = the store's only site).
    lm: the hook site to harvest (required)."""
    lm_path: str = ""
    """lm: Hugging Face model directory or hub id, loaded by saejax.lm.load_lm."""
    lm_dtype: Literal["float32", "bfloat16"] = "float32"
    """lm: dtype of the LM's parameters and forward (the buffer and batches stay float32)."""
    tokens_path: str = ""
    """lm: token dataset directory (saejax.text.tokens), contexts in a seeded per-epoch order."""
    buffer_size: int = 262_144
    """lm: activation rows held on device: two harvests of buffer_size/2 rows, each served over
    buffer_size/2/train.batch_size steps. A multiple of 4 x train.batch_size and of
    2 x buffer_blocks²."""
    buffer_blocks: int = 16
    """lm: blocks of the buffer, the unit of its shuffle (a multiple of mesh.data; batches do not
    depend on the mesh, so keep it fixed to resume a run on another mesh)."""
    lm_batch_contexts: int = 64
    """lm: at most this many contexts per LM forward call (its memory); a multiple of
    buffer_blocks."""
    drop_bos: bool = True
    """lm: drop position 0 of every context; every context must start with BOS (tokens packed
    with bos=every_context). BOS tokens inside contexts are kept."""
    shuffle_contexts: bool = True
    """lm: take contexts in a seeded per-epoch permutation (else in dataset order)."""
    seed: int = 0
    """Seed of the data stream (features, sampling, shuffling)."""


@dataclass
class TrainConfig:
    steps: int = 6000
    """Number of optimizer steps."""
    batch_size: int = 1024
    """Global batch size (activation vectors per step), split over the `data` axis."""
    seed: int = 0
    """Seed for parameter init and resampling."""
    log_every: int = 100
    """Read metrics back to the host every this many steps (the only host syncs)."""
    checkpoint_every: int = 1000
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """Keep the newest N checkpoints."""
    async_checkpointing: bool = True
    """Write checkpoints in the background."""
    run_dir: str = "runs/default"
    """Run directory: checkpoints, metrics.jsonl, config.yaml. An existing run is resumed. May
    be a gs:// or s3:// URL (s3:// checkpoints are staged locally first: `SAEJAX_STAGING_DIR`,
    see saejax/checkpoint.py)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars (needs tensorboardX) to run_dir/tensorboard; needs a local
    run_dir."""
    progress: bool = True
    """Show a progress bar with tokens/s."""
    dead_window_tokens: int = 1_000_000
    """Metrics: a feature counts as dead if it has not fired in this many tokens."""
    fail_on_frozen: bool = False
    """Sweeps: a member whose loss becomes NaN/Inf is frozen at its last good state and the
    others go on; with this, the run then exits with code 3 at the end (after every summary)."""


@dataclass
class Config:
    sae: SAEConfig = field(default_factory=SAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The SAE training config: defaults <- YAML file <- dotted overrides, then validation."""
    cfg = load_dataclass(Config, path, overrides)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- validation


def resolve_mesh_shape(mesh: MeshConfig, n_devices: int) -> tuple[int, int]:
    """(data, model) sizes, filling a -1 with the devices `model` and `sae` leave."""
    data, model, sae = mesh.data, mesh.model, mesh.sae
    if model < 1 or sae < 1:
        raise ConfigError(f"mesh.model and mesh.sae must be >= 1, got {model} and {sae}")
    if data == -1:
        if n_devices % (model * sae):
            raise ConfigError(f"mesh.model × mesh.sae = {model}×{sae} does not divide the "
                              f"{n_devices} devices")
        data = n_devices // (model * sae)
    if data < 1 or sae * data * model != n_devices:
        raise ConfigError(f"mesh.sae × mesh.data × mesh.model = {sae}×{data}×{model} must "
                          f"equal the {n_devices} devices available")
    return data, model


RANGES = {
    "sae.d_in": ">= 1", "sae.n_features": ">= 1",
    "sae.relu.l1_coefficient": ">= 0", "sae.relu.l1_warmup_fraction": "[0, 1]",
    "sae.relu.target_l0": ">= 0",
    "sae.topk.k": ">= 1", "sae.topk.k_aux": ">= 0", "sae.topk.aux_coefficient": ">= 0",
    "sae.topk.dead_tokens_aux": ">= 0",
    # jumprelu rules
    "sae.jumprelu.l0_coefficient": ">= 0", "sae.jumprelu.l0_warmup_fraction": "[0, 1]",
    "sae.jumprelu.target_l0": ">= 0", "sae.jumprelu.threshold_init": "> 0",
    "sae.jumprelu.bandwidth": "> 0",
    # gated rules
    "sae.gated.l1_coefficient": ">= 0", "sae.gated.l1_warmup_fraction": "[0, 1]",
    "sae.gated.target_l0": ">= 0",
    # batchtopk rules
    "sae.batchtopk.threshold_lr": "(0, 1]",
    # matryoshka rules
    "sae.matryoshka.widths": ">= 1",
    "optim.lr": "> 0", "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.eps": "> 0",
    "optim.warmup_steps": ">= 0", "optim.grad_clip": ">= 0",
    "resample.steps": ">= 1", "resample.at_fractions": "(0, 1)", "resample.window_steps": ">= 0",
    "resample.n_inputs": ">= 1", "resample.enc_scale": "> 0",
    "mesh.data": "-1 or >= 1", "mesh.model": ">= 1", "mesh.sae": ">= 1",
    "data.n_true_features": ">= 1", "data.p_active": "(0, 1]", "data.correlated_groups": ">= 0",
    "data.buffer_size": ">= 1", "data.buffer_blocks": ">= 1", "data.lm_batch_contexts": ">= 1",
    "data.seed": ">= 0",
    "train.steps": ">= 1", "train.batch_size": ">= 1", "train.seed": ">= 0",
    "train.log_every": ">= 1", "train.checkpoint_every": ">= 1", "train.keep_checkpoints": ">= 1",
    "train.dead_window_tokens": ">= 1",
}  # fmt: skip
"""The range of every numeric field (`typedconfig.check_ranges`; NaN/Inf is rejected for all).
tests/test_config.py checks that every numeric field of `Config` has one."""


def validate(cfg: Config, n_devices: int | None = None) -> None:
    """Reject out-of-range values and impossible combinations before any compute. Mesh checks
    need `n_devices`."""
    s, t = cfg.sae, cfg.train
    # Only the chosen family's sections are used, so only they are range-checked.
    used = {s.arch, *get_family(s.arch).sections}
    other_families = tuple(f"sae.{name}." for name in FAMILIES if name not in used)
    typedconfig.check_ranges(cfg, RANGES, skip=other_families)
    get_family(s.arch).check(s)
    if t.tensorboard and is_url(t.run_dir):
        raise ConfigError(f"train.tensorboard=true needs a local train.run_dir (TensorBoard's "
                          f"event files are appended to, which {t.run_dir} cannot be); set "
                          f"train.tensorboard=false")
    if cfg.data.source == "npy" and not cfg.data.paths:
        raise ConfigError("data.paths must name .npy files when data.source=npy")
    if cfg.data.source == "store" and not cfg.data.store_path:
        raise ConfigError("data.store_path must name an activation store when data.source=store")
    if cfg.data.source == "lm":
        d = cfg.data
        for name in ("lm_path", "tokens_path", "site"):
            if not getattr(d, name):
                raise ConfigError(f"data.{name} must be set when data.source=lm")
        V, B = d.buffer_blocks, t.batch_size
        if d.buffer_size % (4 * B):
            raise ConfigError(f"data.buffer_size={d.buffer_size} must be a multiple of "
                              f"4 x train.batch_size={4 * B}")
        if (d.buffer_size // 2) % (V * V):
            raise ConfigError(f"data.buffer_size={d.buffer_size} must be a multiple of "
                              f"2 x data.buffer_blocks²={2 * V * V}")
        if B % (2 * V):
            raise ConfigError(f"train.batch_size={B} must be a multiple of "
                              f"2 x data.buffer_blocks={2 * V}")
        if d.lm_batch_contexts % V:
            raise ConfigError(f"data.lm_batch_contexts={d.lm_batch_contexts} must be a multiple "
                              f"of data.buffer_blocks={V}")
    if n_devices is not None:
        data, model = resolve_mesh_shape(cfg.mesh, n_devices)
        if s.n_features % model:
            raise ConfigError(
                f"mesh.model={model} does not divide sae.n_features={s.n_features}"
            )
        if t.batch_size % data:
            raise ConfigError(f"mesh.data={data} does not divide train.batch_size={t.batch_size}")
        if cfg.data.source == "lm" and cfg.data.buffer_blocks % data:
            raise ConfigError(f"mesh.data={data} does not divide "
                              f"data.buffer_blocks={cfg.data.buffer_blocks}")


def resample_steps(cfg: Config) -> list[int]:
    """The steps at which dead features are resampled for this run (empty when disabled)."""
    r = cfg.resample
    if not r.enabled or get_family(cfg.sae.arch).resample is None:
        return []
    if r.at_fractions:
        return sorted({int(f * cfg.train.steps) for f in r.at_fractions})
    return sorted(s for s in r.steps if 0 < s < cfg.train.steps)


# ---------------------------------------------------------------- reference


def config_reference(root: type = Config) -> str:
    """Markdown table of every field: name, default, and the docstring beside it."""
    return typedconfig.config_reference(root)
