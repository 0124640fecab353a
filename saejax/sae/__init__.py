"""SAE families, each one record (`saejax.sae.family.Family`), registered by name."""

from saejax.sae import relu, topk
from saejax.sae import batchtopk, matryoshka
from saejax.sae import gated, jumprelu
from saejax.sae.base import SAE, LossContext
from saejax.sae.config import SAEConfig
from saejax.sae.family import (FAMILIES, Family, family_for_saelens, get_family, register,
                               resample_standard)

register(Family("relu", relu.ReluSAE, hparams=relu.hparams, resample=resample_standard,
                init_state=relu.init_state, saelens_architecture="standard",
                data_fields=relu.DATA_FIELDS))
register(Family("topk", topk.TopKSAE, hparams=topk.hparams, saelens_architecture="topk",
                saelens_options=topk.saelens_options, from_saelens=topk.from_saelens,
                check=topk.check, data_fields=topk.DATA_FIELDS,
                bound_fields=topk.BOUND_FIELDS))
register(Family("batchtopk", batchtopk.BatchTopKSAE, hparams=batchtopk.hparams,
                init_state=batchtopk.init_state, saelens_architecture="jumprelu",
                sections=("topk",), check=batchtopk.check, inference=batchtopk.inference,
                data_fields=batchtopk.DATA_FIELDS,
                bound_fields=topk.BOUND_FIELDS))
register(Family("matryoshka", matryoshka.MatryoshkaSAE, hparams=batchtopk.hparams,
                init_state=batchtopk.init_state, saelens_architecture="jumprelu",
                sections=("topk", "batchtopk"), check=matryoshka.check,
                inference=batchtopk.inference, data_fields=batchtopk.DATA_FIELDS,
                bound_fields=topk.BOUND_FIELDS))
register(Family("jumprelu", jumprelu.JumpReLUSAE, hparams=jumprelu.hparams,
                init_state=jumprelu.init_state, saelens_architecture="jumprelu",
                saelens_options=jumprelu.saelens_options, from_saelens=jumprelu.from_saelens,
                check=jumprelu.check, to_saelens=jumprelu.to_saelens,
                from_saelens_tensors=jumprelu.from_saelens_tensors,
                data_fields=jumprelu.DATA_FIELDS))
register(Family("gated", gated.GatedSAE, hparams=gated.hparams, resample=gated.resample,
                init_state=relu.init_state, saelens_architecture="gated",
                from_saelens=gated.from_saelens, check=gated.check,
                data_fields=gated.DATA_FIELDS))


def make_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    return get_family(cfg.arch).make(cfg, seed)


__all__ = ["FAMILIES", "Family", "LossContext", "SAE", "SAEConfig", "family_for_saelens",
           "get_family", "make_sae", "register"]
