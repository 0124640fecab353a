"""Harvesting a real (tiny, transformers-made) GPT-2 over a real token dataset into a store: the
stored rows are the model's own activations at the site, BOS positions dropped; bad sites and
vocabularies are named."""

import os

import numpy as np
import pytest

from saejax.config import ConfigError
from saejax.data.harvest import harvest
from saejax.data.store import ActivationStore
from saejax.lm import load_lm
from saejax.text.tokenizer import train_bpe
from saejax.text.tokens import write_token_dataset

SITE = "blocks.0.mlp.hook_post"
DOCS = [f"document {i}: the quick brown fox jumps over {i % 7} lazy dogs. " * 3 for i in range(60)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("harvest")
    tok = train_bpe(DOCS, vocab_size=300, out_dir=root / "tok")
    ds = write_token_dataset(DOCS, tok, root / "tokens", ctx_len=16, contexts_per_shard=16)
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=4, n_inner=64, n_positions=16,
                        activation_function="relu", vocab_size=len(tok), bos_token_id=0,
                        eos_token_id=0)
    tf.GPT2LMHeadModel(cfg).save_pretrained(root / "lm")
    return root, ds


def test_store_holds_the_models_activations(setup):
    root, ds = setup
    manifest = harvest(root / "lm", root / "tokens", root / "store", [SITE], contexts_per_shard=8,
                       batch_contexts=4, progress=False)
    assert manifest["provenance"]["model_type"] == "gpt2"
    lm = load_lm(root / "lm")
    tokens = ds.take(np.arange(len(ds)))
    _, cache = lm.run_with_cache(tokens, [SITE])
    acts = np.asarray(cache[SITE])
    want = acts[tokens != ds.manifest["bos_id"]]  # row order: contexts, then positions
    store = ActivationStore(root / "store", SITE)
    got = store.gather(np.arange(store.n_rows))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert store.d_in == 64 and len(got) < tokens.size


def test_errors_name_the_site_and_the_vocabulary(setup, tmp_path):
    root, _ = setup
    with pytest.raises(ConfigError, match=r"unknown hook site 'blocks.3.mlp.hook_post'; valid "
                                          r"sites: blocks.0.hook_resid_pre, "):
        harvest(root / "lm", root / "tokens", tmp_path / "s", ["blocks.3.mlp.hook_post"])
    with pytest.raises(ConfigError, match="does not exist"):
        harvest(tmp_path / "no_model", root / "tokens", tmp_path / "s", [SITE])
    with pytest.raises(ConfigError, match="not a token dataset"):
        harvest(root / "lm", tmp_path, tmp_path / "s", [SITE])


def test_max_contexts_harvests_a_prefix(setup, tmp_path):
    root, ds = setup
    full = ActivationStore(root / "store", SITE) if (root / "store").exists() else None
    harvest(root / "lm", root / "tokens", tmp_path / "part", [SITE], max_contexts=5,
            progress=False)
    part = ActivationStore(tmp_path / "part", SITE)
    tokens = ds.take(np.arange(5))
    assert part.n_rows == int((tokens != ds.manifest["bos_id"]).sum())
    if full is not None:
        np.testing.assert_allclose(part.gather(np.arange(part.n_rows)),  # other batch shapes
                                   full.gather(np.arange(part.n_rows)), rtol=1e-5, atol=1e-6)


def test_holdout_leaves_the_last_contexts_out(setup, tmp_path):
    root, ds = setup
    m = harvest(root / "lm", root / "tokens", tmp_path / "s", [SITE], holdout=7, progress=False)
    assert m["n_contexts"] == len(ds) - 7 and m["provenance"]["contexts"] == f"the first {len(ds) - 7}"
    # recorded absolute, and relative to the store: a store moved with its model finds it again
    assert m["provenance"]["model"] == str((root / "lm").absolute())
    assert m["provenance"]["model_relative"] == os.path.relpath(root / "lm", tmp_path / "s")
    for bad in (len(ds), -1):
        with pytest.raises(ConfigError, match="holdout must be in"):
            harvest(root / "lm", root / "tokens", tmp_path / "t", [SITE], holdout=bad)
    assert not (tmp_path / "t").exists()
