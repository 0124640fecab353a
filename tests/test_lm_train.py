"""LM training and HF export: save_hf round trips through transformers and load_lm; train_lm
learns a Markov chain, resumes bit for bit, and agrees across meshes.

The training runs share one token dataset: documents drawn from a Markov chain in which every
token has two equally likely successors, so the best achievable loss is ln 2 ≈ 0.69 against
ln(vocab) ≈ 4.16 for a model that has learnt nothing.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from saejax.lm import load_lm  # noqa: E402
from saejax.lm.model import LM, LMConfig  # noqa: E402
from saejax.lm.save import save_hf  # noqa: E402
from saejax.train.lm import (LMDataConfig, LMModelConfig, LMOptimConfig, LMRunConfig,  # noqa: E402
                             LMTrainConfig, batch_indices, load_lm_train_config, train_lm,
                             validate)
from saejax.config import MeshConfig  # noqa: E402
from saejax.text.tokens import write_token_dataset  # noqa: E402

V, CTX, STEPS = 64, 32, 120


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """The training runs below compile the same programs several times (a resumed run compiles
    what the uninterrupted one did): JAX's persistent cache shares them, which keeps this file
    fast on CPU. The previous settings are restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
        jax.config.update(k, v)
    cc.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


def _flat(lm) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(lm, nnx.Param))}


def _torch_logits(model_dir, tokens) -> np.ndarray:
    model = tf.GPT2LMHeadModel.from_pretrained(model_dir)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens, np.int64))).logits.numpy()


def _params(run_dir):
    from safetensors.numpy import load_file
    return load_file(str(run_dir / "hf" / "model.safetensors"))


def _records(run_dir) -> dict[int, dict]:
    """metrics.jsonl log/eval records by step."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "event" not in r}


# ---------------------------------------------------------------- save_hf


def _random_lm(cfg: LMConfig):
    """An LM with scale ~0.25 weights (norm scales around 1), filled from numpy without compiling
    anything, so a wrong head split or a missing transpose shows in the logits."""
    rng = np.random.default_rng(0)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))))
    filled = []
    for path, var in nnx.to_flat_state(abstract):
        shape = var.get_value().shape
        norm = path[-1] == "scale"
        value = (1.0 + 0.1 * rng.standard_normal(shape) if norm
                 else 0.25 * rng.standard_normal(shape))
        filled.append((path, var.replace(value=jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _gpt2_config(**kw) -> LMConfig:
    return LMConfig(**{**dict(model_type="gpt2", vocab_size=96, d_model=32, n_layers=2,
                              n_heads=4, d_head=8, d_mlp=64, n_kv_heads=4, act="relu", n_ctx=16,
                              qkv_bias=True, attn_out_bias=True, mlp_bias=True), **kw})


@pytest.mark.parametrize("tied", [False, True])
def test_save_hf_round_trip(tmp_path, tied):
    lm = _random_lm(_gpt2_config(tied_embeddings=tied))
    tok_dir = None
    if tied:  # also check the tokenizer files travel
        from saejax.text.tokenizer import train_bpe
        tok_dir = tmp_path / "tok"
        train_bpe(["the cat sat on the mat"] * 4, 264, tok_dir)
    out = save_hf(lm, None, tmp_path / "hf", tok_dir, bos_token_id=0, eos_token_id=0)

    hf = json.loads((out / "config.json").read_text())
    assert (hf["n_layer"], hf["n_embd"], hf["n_head"], hf["n_inner"]) == (2, 32, 4, 64)
    assert (hf["activation_function"], hf["n_positions"], hf["vocab_size"]) == ("relu", 16, 96)
    assert hf["tie_word_embeddings"] is tied and hf["bos_token_id"] == 0
    assert not list(tmp_path.glob(".hf*")), "temporary directory left behind"

    tokens = np.random.default_rng(0).integers(0, 96, (2, 16))
    ours = np.asarray(lm(jnp.asarray(tokens)))
    theirs = _torch_logits(out, tokens)
    assert ours.std() > 0.5
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    back = _flat(load_lm(out))
    want = _flat(lm)
    assert back.keys() == want.keys()
    for k in want:
        assert back[k].dtype == want[k].dtype and np.array_equal(back[k], want[k]), k
    if tied:
        assert tf.AutoTokenizer.from_pretrained(out).decode([0]) == "<|endoftext|>"

    with pytest.raises(FileExistsError):
        save_hf(lm, None, tmp_path / "hf")
    save_hf(lm, None, tmp_path / "hf", overwrite=True)  # replaces atomically


def test_save_hf_rejects_what_it_cannot_write(tmp_path):
    cfg = _gpt2_config(norm="rmsnorm", mlp_bias=False)
    with pytest.raises(ValueError, match="not a GPT-2 model"):
        save_hf(_random_lm(cfg), None, tmp_path / "hf")
    llama = _gpt2_config(model_type="llama", norm="rmsnorm", n_ctx=0, qkv_bias=False,
                         attn_out_bias=False, mlp_bias=False, gated_mlp=True)
    with pytest.raises(NotImplementedError, match="llama"):
        save_hf(_random_lm(llama), None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- train_lm


class _IntTokenizer:
    """Documents are space-separated token ids; id 0 is <|endoftext|> (BOS and EOS)."""

    bos_token_id = eos_token_id = 0
    bos_token = eos_token = "<|endoftext|>"
    name_or_path = "int-tokenizer"

    def __len__(self):
        return V

    def __call__(self, texts, **_):
        return {"input_ids": [[int(x) for x in t.split()] for t in texts]}


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    succ = rng.integers(1, V, (V, 2))  # two successors per token, each with probability 1/2
    docs = []
    for _ in range(120):
        seq = [int(rng.integers(1, V))]
        for _ in range(int(rng.integers(40, 120))):
            seq.append(int(succ[seq[-1], rng.integers(2)]))
        docs.append(" ".join(map(str, seq)))
    path = tmp_path_factory.mktemp("tokens")
    ds = write_token_dataset(docs, _IntTokenizer(), path, CTX, contexts_per_shard=100)
    assert ds.n_contexts > 250
    return path


def _cfg(tokens_dir, run_dir, **train) -> LMTrainConfig:
    return LMTrainConfig(
        model=LMModelConfig(n_layer=1, n_embd=32, n_head=4, n_inner=64),
        data=LMDataConfig(tokens=str(tokens_dir), val_contexts=40),
        optim=LMOptimConfig(lr=1e-2, warmup_steps=10),
        train=LMRunConfig(**{"steps": STEPS, "batch_size": 16, "log_every": 10,
                             "eval_every": 30, "checkpoint_every": 30, "keep_checkpoints": 5,
                             "run_dir": str(run_dir), "progress": False, **train}),
        mesh=MeshConfig(data=1),
    )


@pytest.fixture(scope="module")
def full_run(tokens_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    return run_dir, train_lm(_cfg(tokens_dir, run_dir), quiet=True)


def test_config_loading(tmp_path):
    path = tmp_path / "lm.yaml"
    path.write_text("model:\n  n_embd: 64\noptim:\n  lr: 3e-4\n")
    cfg = load_lm_train_config(path, ["train.steps=5", "data.tokens=/data/tok"])
    assert (cfg.model.n_embd, cfg.model.n_inner, cfg.optim.lr) == (64, 512, 3e-4)
    assert (cfg.train.steps, cfg.data.tokens) == (5, "/data/tok")
    with pytest.raises(ValueError, match="model.n_layers"):
        load_lm_train_config(None, ["model.n_layers=2"])
    with pytest.raises(ValueError, match="n_head"):
        validate(load_lm_train_config(None, ["model.n_head=3", "data.tokens=x"]))


def test_data_order_is_a_function_of_the_step():
    n, b = 50, 16
    stream = np.concatenate([batch_indices(s, b, n, 3) for s in range(25)])  # 8 epochs
    for e in range(8):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))  # each epoch a permutation
    assert not np.array_equal(stream[:n], stream[n:2 * n])
    assert np.array_equal(batch_indices(7, b, n, 3), stream[7 * b:8 * b])


def test_train_lm_learns_and_exports(full_run, tokens_dir):
    run_dir, summary = full_run
    assert summary["step"] == STEPS and summary["val_loss"] < 0.5 * math.log(V)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "train_loss" in r and "event" not in r]
    assert [r["step"] for r in logs] == list(range(10, STEPS + 1, 10))
    assert logs[-1]["train_loss"] < 0.5 * logs[0]["train_loss"]
    assert all(r["tokens_per_s"] > 0 for r in logs)
    assert [r["step"] for r in records if "val_loss" in r and "event" not in r] == [30, 60, 90, 120]
    assert records[-1]["event"] == "summary"

    # The exported model: transformers' logits and loss agree with saejax's.
    from saejax.text.tokens import TokenDataset
    ds = TokenDataset(tokens_dir)
    val = ds.take(np.arange(ds.n_contexts - 40, ds.n_contexts))
    ours = np.asarray(load_lm(run_dir / "hf")(jnp.asarray(val[:4])))
    np.testing.assert_allclose(ours, _torch_logits(run_dir / "hf", val[:4]), atol=1e-4, rtol=0)
    model = tf.GPT2LMHeadModel.from_pretrained(run_dir / "hf")
    with torch.no_grad():
        t = torch.tensor(val.astype(np.int64))
        hf_loss = float(model(t, labels=t).loss)
    assert abs(hf_loss - summary["val_loss"]) < 1e-4
    hf = json.loads((run_dir / "hf" / "config.json").read_text())
    assert (hf["n_positions"], hf["vocab_size"], hf["bos_token_id"], hf["eos_token_id"]) == (
        CTX, V, 0, 0)


def test_resume_is_bitwise(full_run, tokens_dir, tmp_path):
    run_dir, summary = full_run
    cfg = _cfg(tokens_dir, tmp_path / "resumed")
    half = train_lm(cfg, stop_at=STEPS // 2, quiet=True)  # as if preempted after step 60
    assert half["step"] == STEPS // 2 and half["hf_dir"] is None
    again = train_lm(cfg, quiet=True)  # a fresh call restores the step-60 checkpoint
    assert again["step"] == STEPS and again["val_loss"] == summary["val_loss"]
    want, got = _params(run_dir), _params(tmp_path / "resumed")
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(want[k], got[k]), k
    strip = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731
    want, got = _records(run_dir), _records(tmp_path / "resumed")
    assert want.keys() == got.keys()
    assert all(strip(want[k]) == strip(got[k]) for k in want)

    changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=2e-2))
    with pytest.raises(ValueError, match="optim.lr"):
        train_lm(changed, quiet=True)


def test_multi_device_agrees(full_run, tokens_dir, tmp_path):
    """4-way data parallel = 1 device to float32 rounding, for the first 30 steps. (Later on,
    at the peak learning rate, the runs drift apart chaotically from there: by step ~100 the
    logged losses differ in the 4th digit, as any change of summation order would cause.)"""
    run_dir, _ = full_run
    cfg = _cfg(tokens_dir, tmp_path / "mesh4")
    four = train_lm(dataclasses.replace(cfg, mesh=MeshConfig(data=4)), stop_at=30, quiet=True)
    assert four["step"] == 30
    one, four = _records(run_dir), _records(tmp_path / "mesh4")
    for step in (10, 20, 30):
        for key in ("train_loss", "loss", "grad_norm"):
            assert four[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert four[30]["val_loss"] == pytest.approx(one[30]["val_loss"], rel=1e-6)
