"""Flax NNX language models with TransformerLens-style hook sites, loaded from Hugging Face
checkpoints (safetensors) without torch. See `model.py` for the architecture and jit usage,
`hooks.py` for the site names, `load.py` for loading, `stream.py` for reading site activations
over a token dataset."""

from saejax.lm.hooks import BLOCK_SITES, hook_names
from saejax.lm.load import MissingTensorError, lm_config, load_lm
from saejax.lm.model import LM, LMConfig, RopeConfig, cache_fn, init_lm

__all__ = [
    "BLOCK_SITES",
    "LM",
    "LMConfig",
    "MissingTensorError",
    "RopeConfig",
    "cache_fn",
    "hook_names",
    "init_lm",
    "lm_config",
    "load_lm",
]
