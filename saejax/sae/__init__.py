"""SAE families, each one record (`saejax.sae.family.Family`), registered by name."""

from saejax.sae import relu, topk
from saejax.sae.base import SAE, LossContext
from saejax.sae.config import SAEConfig
from saejax.sae.family import (FAMILIES, Family, family_for_saelens, get_family, register,
                               resample_standard)

register(Family("relu", relu.ReluSAE, hparams=relu.hparams, resample=resample_standard,
                init_state=relu.init_state, saelens_architecture="standard"))
register(Family("topk", topk.TopKSAE, hparams=topk.hparams, saelens_architecture="topk",
                saelens_options=topk.saelens_options, from_saelens=topk.from_saelens,
                check=topk.check))


def make_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    return get_family(cfg.arch).make(cfg, seed)


__all__ = ["FAMILIES", "Family", "LossContext", "SAE", "SAEConfig", "family_for_saelens",
           "get_family", "make_sae", "register"]
