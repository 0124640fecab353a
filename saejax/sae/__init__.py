"""SAE families behind one interface (`saejax.sae.base.SAE`)."""

from flax import nnx

from saejax.config import SAEConfig
from saejax.sae.base import AXES, SAE, LossContext
from saejax.sae.relu import ReluSAE
from saejax.sae.topk import TopKSAE

FAMILIES: dict[str, type[SAE]] = {"relu": ReluSAE, "topk": TopKSAE}


def make_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    return FAMILIES[cfg.arch](cfg, rngs=nnx.Rngs(params=seed))


__all__ = ["AXES", "FAMILIES", "LossContext", "SAE", "make_sae"]
