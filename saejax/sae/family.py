"""An SAE family is one record: everything the rest of saejax asks about a family.

The train step, resampling, checkpoints, export and loading never name a family or a parameter;
they ask its `Family`. Adding a family is a module under `saejax/sae/` (its nnx module and,
if it has options, a section in `saejax.sae.config`) and one `register(Family(...))`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from saejax.errors import ConfigError
from saejax.sae.base import SAE
from saejax.sae.config import SAEConfig


def fold_input_scale_standard(params: dict, scale: float) -> dict:
    """Parameters for raw inputs x of an SAE trained on s·x (see `saejax.export`):
    W_enc·s, W_dec/s, b_dec/s; b_enc unchanged. Pre-activations, hence codes, are unchanged."""
    s = float(scale)
    return {**params, "W_enc": params["W_enc"] * s, "W_dec": params["W_dec"] / s,
            "b_dec": params["b_dec"] / s}


def resample_standard(params: dict, dead: jax.Array, unit: jax.Array,
                      enc_norm: jax.Array) -> tuple[dict, dict]:
    """Towards Monosemanticity's rule for W_enc/b_enc/W_dec: each dead feature's decoder row <-
    `unit` [F, d] (an input at unit norm), its encoder row <- the same input at norm `enc_norm`,
    its encoder bias <- 0. Returns (new params, {param: bool mask of the entries changed}), the
    masks broadcastable to each parameter (their Adam moments are reset there)."""
    masks = {"W_enc": dead[None, :], "b_enc": dead, "W_dec": dead[:, None],
             "b_dec": jnp.zeros(params["b_dec"].shape, bool)}
    new = {**params,
           "W_enc": jnp.where(masks["W_enc"], unit.T * enc_norm, params["W_enc"]),
           "b_enc": jnp.where(dead, 0.0, params["b_enc"]),
           "W_dec": jnp.where(masks["W_dec"], unit, params["W_dec"])}
    return new, masks


def _none(cfg: SAEConfig, *run) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    name: str
    """`sae.arch` value."""
    module: type[SAE]
    """The nnx module: `module(cfg, rngs=...)`, with encode/decode/loss/fired and `AXES`."""
    hparams: Callable[[SAEConfig, int, int], dict[str, float]] = _none
    """(cfg, train steps, batch size) -> scalars of the loss carried in the train state as
    arrays (not compiled in), so one compiled step serves many settings; the loss reads them
    from `LossContext.hparams`."""
    resample: Callable[..., tuple[dict, dict]] | None = None
    """How dead features are reinitialised (`resample_standard`'s signature), or None: the
    family is never resampled (e.g. TopK, which has AuxK)."""
    init_state: Callable[[SAEConfig], dict[str, jax.Array]] = _none
    """Non-parameter state carried across steps and checkpointed (e.g. a running threshold);
    the loss reads it from `LossContext.state` and returns its next value as aux["state"]."""
    state_axes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Logical axes of each `init_state` entry (absent = replicated)."""
    saelens_architecture: str | None = None
    """SAELens `architecture` it exports as and is loaded from; None: not exportable."""
    saelens_options: Callable[[SAEConfig], dict[str, Any]] = _none
    """Extra SAELens cfg.json keys (e.g. {"k": 32})."""
    from_saelens: Callable[[dict], dict[str, Any]] = lambda cfg_json: {}
    """`sae` config fields (a nested dict, e.g. {"topk": {"k": 32}}) read from a SAELens cfg.json."""
    sections: tuple[str, ...] = ()
    """The `SAEConfig` sections it reads besides its own (e.g. BatchTopK reads `topk`'s k)."""
    check: Callable[[SAEConfig], None] = lambda cfg: None
    """Raises ConfigError (naming the field) for settings of its section that cannot work."""
    fold_input_scale: Callable[[dict, float], dict] = fold_input_scale_standard
    """Parameters for raw inputs of an SAE trained on scale·x (exports and evaluation)."""
    inference: Callable[[SAEConfig, dict, dict], tuple[SAEConfig, dict]] | None = None
    """How a trained SAE of this family runs at evaluation and export, when that is another
    family: (cfg, params, family_state) -> (cfg with that family's `arch`, its params) (e.g.
    BatchTopK is evaluated as a JumpReLU whose threshold is the θ it estimated). None: as itself.
    A family with an `inference` is never what a SAELens folder loads as."""
    to_saelens: Callable[[dict], dict] = lambda params: params
    """SAELens tensors (name -> array) from the (folded) parameters, when names or
    representation differ (e.g. log θ -> threshold)."""
    from_saelens_tensors: Callable[[dict], dict] = lambda tensors: tensors
    """The inverse of `to_saelens`: parameters from a SAELens folder's tensors."""
    bound_fields: tuple[str, ...] = ()
    """Fields carried as data up to the value the step is compiled for (e.g. TopK's k: the
    step keeps the k_max largest and masks the ranks beyond each member's k); a sweep group
    compiles for their largest values."""
    data_fields: tuple[str, ...] = ()
    """Fields of its sections (`section.field`) that reach the train step only as `hparams` or
    initial values, not as compiled constants: a sweep varies them inside one compiled step
    (`saejax.sweep`; tests/test_sweep.py checks the program does not change with them)."""

    @property
    def param_axes(self) -> dict[str, tuple[str, ...]]:
        return self.module.AXES

    def make(self, cfg: SAEConfig, seed: int = 0) -> SAE:
        return self.module(cfg, rngs=nnx.Rngs(params=seed))

    def graphdef(self, cfg: SAEConfig) -> Any:
        """The module's structure without parameters: `nnx.merge(graphdef, params)` is the SAE."""
        return nnx.split(nnx.eval_shape(lambda: self.make(cfg)))[0]

    def for_inference(self, cfg: SAEConfig, params: dict, state: dict) -> tuple[SAEConfig, dict]:
        """(cfg, params) of the SAE as evaluated and exported (see `inference`), computing in
        float32 whatever precision it trained in (so evaluation equals the SAELens export)."""
        if self.inference is not None:
            cfg, params = self.inference(cfg, params, state)
        if cfg.compute_dtype != "float32":
            cfg = dataclasses.replace(cfg, compute_dtype="float32")
        return cfg, params


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make `family` available as `sae.arch=<name>` (replacing one of the same name)."""
    FAMILIES[family.name] = family
    return family


def get_family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise ConfigError(f"sae.arch: {arch!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[arch]


def family_for_saelens(architecture: str) -> Family | None:
    """The family that loads SAELens's `architecture`, or None."""
    return next((f for f in FAMILIES.values()
                 if f.saelens_architecture == architecture and f.inference is None), None)
