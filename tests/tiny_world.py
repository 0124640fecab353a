"""A tiny but real text -> LM -> SAE world for evaluation and analysis tests.

Built once per test session (`tiny_world` fixture in conftest.py): a byte-level BPE trained on a
small multilingual text (English with some Arabic and Cyrillic, so script features exist), a token
dataset, a one-layer ReLU GPT-2 saved as a Hugging Face directory (random weights: analysis code
must be right for any model), an activation store of its MLP, and SAE runs trained briefly on it
(two dictionary sizes, two seeds) plus one SAELens export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SITE = "blocks.0.mlp.hook_post"
D_MODEL, D_MLP, CTX = 32, 64, 16

ENGLISH = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran in the park while the children played",
    "python code reads a file and prints every line",
    "rain fell on the old town through the night",
    "she wrote a letter to her brother in the city",
]
ARABIC = ["بسم الله الرحمن الرحيم", "الحمد لله رب العالمين", "مالك يوم الدين"]
CYRILLIC = ["кошка сидела на окне", "собака бежала по улице"]


def documents(n: int = 400) -> list[str]:
    """English-dominant documents; every 9th is Arabic and every 13th Cyrillic."""
    docs = []
    for i in range(n):
        if i % 9 == 4:
            docs.append(ARABIC[i % len(ARABIC)])
        elif i % 13 == 6:
            docs.append(CYRILLIC[i % len(CYRILLIC)])
        else:
            docs.append(f"{ENGLISH[i % len(ENGLISH)]} {i % 7}.")
    return docs


@dataclass(frozen=True)
class TinyWorld:
    root: Path
    tokenizer: Path
    """Tokenizer directory (AutoTokenizer loads it)."""
    tokens: Path
    """Token dataset (saejax.text.tokens), contexts of CTX tokens with BOS first."""
    lm: Path
    """HF GPT-2 directory: 1 layer, d_model D_MODEL, d_mlp D_MLP, ReLU."""
    store: Path
    """Activation store of SITE over every context."""
    sae_small: Path
    """SAE run: 64 features, seed 0."""
    sae_small_seed1: Path
    """SAE run: 64 features, seed 1 (for cross-seed matching)."""
    sae_large: Path
    """SAE run: 256 features, seed 0 (for splitting)."""
    sae_export: Path
    """SAELens export of sae_small."""


def _train_sae(world_root: Path, store: Path, name: str, n_features: int, seed: int) -> Path:
    from saejax.config import load_config
    from saejax.train.loop import train

    run = world_root / name
    cfg = load_config(None, [
        "data.source=store", f"data.store_path={store}", f"data.site={SITE}",
        f"sae.d_in={D_MLP}", f"sae.n_features={n_features}", "sae.relu.l1_coefficient=1e-3",
        "train.steps=60", "train.batch_size=128", "train.log_every=30",
        f"train.run_dir={run}", f"train.seed={seed}", "train.progress=false",
        "resample.enabled=false"])
    train(cfg)
    return run


def build(root: Path) -> TinyWorld:
    from saejax.export import export_run
    from saejax.data.harvest import harvest
    from saejax.lm.gpt2 import config_from_hf
    from saejax.lm.model import init_lm
    from saejax.lm.save import save_hf
    from saejax.text.tokenizer import train_bpe
    from saejax.text.tokens import write_token_dataset
    from transformers import GPT2Config

    docs = documents()
    tok_dir = root / "tokenizer"
    tokenizer = train_bpe(docs, 400, tok_dir)
    tokens = root / "tokens"
    write_token_dataset(docs, tokenizer, tokens, ctx_len=CTX)
    hf = GPT2Config(n_layer=1, n_embd=D_MODEL, n_head=4, n_inner=D_MLP, n_positions=CTX,
                    vocab_size=len(tokenizer), activation_function="relu")
    lm_cfg = config_from_hf(hf)
    lm_dir = save_hf(init_lm(lm_cfg, seed=0), lm_cfg, root / "lm", tok_dir,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    store = root / "store"
    harvest(lm_dir, tokens, store, [SITE], progress=False)
    small = _train_sae(root, store, "sae_small", 64, 0)
    return TinyWorld(
        root=root, tokenizer=tok_dir, tokens=tokens, lm=lm_dir, store=store, sae_small=small,
        sae_small_seed1=_train_sae(root, store, "sae_small_seed1", 64, 1),
        sae_large=_train_sae(root, store, "sae_large", 256, 0),
        sae_export=export_run(small, root / "sae_small_export"),
    )
