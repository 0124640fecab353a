"""Activation store: harvest layout and contents, exact resume, argument checks, the shuffled
reader (epochs, process splits), and damage detection. A deterministic numpy "LM" stands in
for the jitted forward, so no model is needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from saejax.atomic import MANIFEST, MARKER, sha256_file
from saejax.data.source import ActivationSource
from saejax.data.store import ActivationStore, read_store_manifest
from saejax.data.store_writer import PROGRESS, harvest_to_store

from host_slices import host_rows  # tests/host_slices.py

VOCAB, CTX, BOS = 40, 6, 1
D_RESID, D_MLP = 8, 12
SITES = ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"]


class Contexts:
    """The part of `TokenDataset` the writer uses: len, take, ctx_len, bos_id."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, VOCAB, (n, CTX)).astype(np.int32)
        self.tokens[:, 0] = BOS                          # every context starts with BOS
        self.tokens[rng.random((n, CTX)) < 0.05] = BOS   # and a few BOS mid-context
        self.ctx_len, self.bos_id = CTX, BOS

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, idx) -> np.ndarray:
        return self.tokens[np.asarray(idx)]


class FakeLM:
    """Deterministic stand-in for a jitted forward: embeddings + positions, two 'sites'.
    Raises after `fail_after` calls (a crash mid-harvest); counts calls."""

    def __init__(self, fail_after: int | None = None):
        rng = np.random.default_rng(123)
        self.emb = rng.normal(size=(VOCAB, D_RESID)).astype(np.float32)
        self.pos = rng.normal(size=(CTX, D_RESID)).astype(np.float32)
        self.w = rng.normal(size=(D_RESID, D_MLP)).astype(np.float32)
        self.fail_after, self.calls = fail_after, 0

    def __call__(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        assert tokens.dtype == np.int32
        resid = np.tanh(self.emb[tokens] + self.pos[None])
        return {SITES[0]: resid, SITES[1]: np.maximum(resid @ self.w, 0), "ignored": resid}

    def table(self, tokens: np.ndarray, site: str, drop_bos: bool = True) -> np.ndarray:
        """The rows a store of `tokens` should hold for `site`, float32."""
        x = self(tokens)[site].reshape(-1, D_RESID if site == SITES[0] else D_MLP)
        self.calls -= 1
        return x[tokens.reshape(-1) != BOS] if drop_bos else x


KW = dict(sites=SITES, contexts_per_shard=10, batch_contexts=4)  # 3 batches/shard, last padded


def harvest(ctx, out, lm=None, **kw):
    return harvest_to_store(ctx, lm or FakeLM(), out, **{**KW, "provenance": {"model": "fake"},
                                                         **kw})


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


@pytest.fixture(scope="module")
def ctx():
    return Contexts(47)  # 5 shards of 10 contexts, the last one 7


@pytest.fixture(scope="module")
def store_f32(ctx, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32")
    harvest(ctx, out)
    return out


# -- writing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_harvest_layout_and_contents(ctx, tmp_path, dtype):
    m = harvest(ctx, tmp_path, dtype=dtype)
    assert sorted(os.listdir(tmp_path)) == sorted([MANIFEST, *SITES]), "no work files left"
    assert m == read_store_manifest(tmp_path)
    n_rows = int((ctx.tokens != BOS).sum())
    assert m["n_rows"] == n_rows and m["dtype"] == dtype and m["ctx_len"] == CTX
    assert m["drop_bos"] is True and m["bos_id"] == BOS and m["provenance"] == {"model": "fake"}
    assert m["contexts_per_shard"] == 10 and m["n_contexts"] == 47
    assert [s["contexts"] for s in m["shards"]] == [[0, 10], [10, 20], [20, 30], [30, 40],
                                                    [40, 47]]
    assert {k: v["d"] for k, v in m["sites"].items()} == {SITES[0]: D_RESID, SITES[1]: D_MLP}
    lm = FakeLM()
    for site in SITES:
        entries = m["sites"][site]["shards"]
        assert [e["file"] for e in entries] == [f"{site}/acts_{i:05d}.npy" for i in range(5)]
        for e, s in zip(entries, m["shards"]):
            arr = np.load(tmp_path / e["file"])
            assert arr.dtype == (np.float32 if dtype == "float32" else np.uint16)
            assert arr.shape[0] == e["rows"] == s["rows"]
            assert sha256_file(str(tmp_path / e["file"])) == e["sha256"]
        src = ActivationStore(tmp_path, site, seed=0)
        assert isinstance(src, ActivationSource)
        assert src.n_rows == n_rows and src.d_in == m["sites"][site]["d"]
        want = lm.table(ctx.tokens, site)
        if dtype == "bfloat16":  # round to nearest even, then exactly back to float32
            want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
        got = src.gather(np.arange(n_rows))
        assert got.dtype == np.float32
        assert got.tobytes() == want.astype(np.float32).tobytes(), "rows in context order"
        src.verify()


def test_keep_bos_and_plain_array_contexts(ctx, tmp_path):
    m = harvest(ctx.tokens, tmp_path, drop_bos=False, sites=SITES[:1], batch_contexts=10)
    src = ActivationStore(tmp_path)  # a single site need not be named
    assert m["n_rows"] == src.n_rows == 47 * CTX and m["bos_id"] is None
    np.testing.assert_array_equal(src.gather(np.arange(src.n_rows)),
                                  FakeLM().table(ctx.tokens, SITES[0], drop_bos=False))


def test_interrupted_harvest_resumes_byte_identical(ctx, store_f32, tmp_path):
    # crash in the 3rd shard (calls 0-8 finish shards 0-1 and part of 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        harvest(ctx, tmp_path, lm=FakeLM(fail_after=8))
    assert not (tmp_path / MANIFEST).exists() and (tmp_path / MARKER).exists()
    with pytest.raises(ValueError, match="interrupted"):
        ActivationStore(tmp_path, SITES[0])
    lines = (tmp_path / PROGRESS).read_text().splitlines()
    assert [json.loads(s)["index"] for s in lines] == [0, 1]

    # a second crash, then the damage a kill can leave: the next shard's file renamed into
    # place but not recorded, a tmp file, and a torn progress line
    with pytest.raises(RuntimeError):
        harvest(ctx, tmp_path, lm=FakeLM(fail_after=3))  # finishes shard 2 only
    assert len((tmp_path / PROGRESS).read_text().splitlines()) == 3
    (tmp_path / SITES[0] / "acts_00003.npy").write_bytes(b"half a shard")
    (tmp_path / SITES[1] / "acts_00003.npy.tmp").write_bytes(b"junk")
    with open(tmp_path / PROGRESS, "a") as f:
        f.write('{"index": 3, "contex')

    with pytest.raises(RuntimeError):
        harvest(ctx, tmp_path, lm=FakeLM(fail_after=3))  # finishes shard 3 only
    assert not (tmp_path / SITES[1] / "acts_00003.npy.tmp").exists()
    lines = (tmp_path / PROGRESS).read_text().splitlines()
    assert [json.loads(s)["index"] for s in lines] == [0, 1, 2, 3], "torn line cut off"

    lm = FakeLM()
    m = harvest(ctx, tmp_path, lm=lm)
    assert lm.calls == 2, "only shard 4 (7 contexts, 2 batches) is computed again"
    assert tree_bytes(tmp_path) == tree_bytes(store_f32), "same bytes as an uninterrupted run"
    assert m == read_store_manifest(store_f32)


def test_rerun_with_other_arguments(ctx, store_f32, tmp_path):
    with pytest.raises(RuntimeError):
        harvest(ctx, tmp_path, lm=FakeLM(fail_after=5))
    with pytest.raises(ValueError, match=r"interrupted harvest with other arguments.*"
                                         r"contexts_per_shard: 10 then, 12 now"):
        harvest(ctx, tmp_path, contexts_per_shard=12)
    with pytest.raises(ValueError, match=r"dtype: 'float32' then, 'bfloat16' now"):
        harvest(ctx, tmp_path, dtype="bfloat16")
    with pytest.raises(ValueError, match="provenance"):
        harvest(ctx, tmp_path, provenance={"model": "other"})
    with pytest.raises(ValueError, match="n_contexts"):
        harvest(Contexts(30), tmp_path)
    harvest(ctx, tmp_path, contexts_per_shard=12, overwrite=True)  # starts over
    assert read_store_manifest(tmp_path)["contexts_per_shard"] == 12

    # a complete store: same arguments -> nothing to do; others -> refused unless overwrite
    before = tree_bytes(store_f32)
    assert harvest(ctx, store_f32, lm=FakeLM(fail_after=0)) == read_store_manifest(store_f32)
    assert tree_bytes(store_f32) == before
    with pytest.raises(FileExistsError, match="complete activation store.*batch_contexts"):
        harvest(ctx, store_f32, batch_contexts=5)
    # killed after the manifest was written but before the work files were removed
    (store_f32 / MARKER).write_text("{}")
    (store_f32 / PROGRESS).write_text("")
    harvest(ctx, store_f32, lm=FakeLM(fail_after=0))
    assert tree_bytes(store_f32) == before


def test_changed_tokens_are_detected_on_resume(tmp_path):
    c = Contexts(30)
    with pytest.raises(RuntimeError):
        harvest(c, tmp_path, lm=FakeLM(fail_after=4))
    c.tokens[3, 2] = (c.tokens[3, 2] + 1) % VOCAB + 2
    with pytest.raises(ValueError, match=r"tokens of contexts 0\.\.9 differ"):
        harvest(c, tmp_path)


def test_writer_refuses_foreign_directories(ctx, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        harvest(ctx, tmp_path)
    os.remove(tmp_path / "notes.txt")
    (tmp_path / SITES[0]).mkdir()
    (tmp_path / SITES[0] / "acts_00000.npy").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="marker"):
        harvest(ctx, tmp_path)


def test_writer_checks_arguments_and_outputs(ctx, tmp_path):
    with pytest.raises(ValueError, match="site name"):
        harvest(ctx, tmp_path, sites=["../up"])
    with pytest.raises(ValueError, match="twice"):
        harvest(ctx, tmp_path, sites=[SITES[0], SITES[0]])
    with pytest.raises(ValueError, match="dtype"):
        harvest(ctx, tmp_path, dtype="float16")
    with pytest.raises(ValueError, match="bos_id"):
        harvest(ctx.tokens, tmp_path)  # a plain array carries no bos_id
    with pytest.raises(ValueError, match="JSON"):
        harvest(ctx, tmp_path, provenance={"model": object()})
    with pytest.raises(ValueError, match="returned no 'missing'"):
        harvest(ctx, tmp_path / "a", sites=["missing"])
    with pytest.raises(ValueError, match=r"shape \(4, 6\)"):
        harvest(ctx, tmp_path / "b", lm=lambda t: {s: np.zeros(t.shape) for s in SITES})
    bad = FakeLM()
    with pytest.raises(ValueError, match="non-finite"):
        harvest(ctx, tmp_path / "c", lm=lambda t: {s: v * np.nan for s, v in bad(t).items()})


def test_token_dataset_provenance(tmp_path):
    from saejax.text.tokens import write_token_dataset

    class CharTokenizer:
        """Characters as ids; '^' (id 1) is BOS/EOS."""
        bos_token = eos_token = "^"
        bos_token_id = eos_token_id = 1
        name_or_path = "chars"

        def __len__(self):
            return 128

        def __call__(self, texts, **_):
            return {"input_ids": [[min(ord(c), 127) for c in t] for t in texts]}

    docs = [f"document number {i} says hello" for i in range(20)]
    ds = write_token_dataset(docs, CharTokenizer(), tmp_path / "tokens", ctx_len=CTX,
                             contexts_per_shard=16)
    seen = []

    def lm(tokens):
        seen.append(tokens)
        x = tokens[..., None].astype(np.float32) * np.ones(3, np.float32)
        return {"embed": x}

    m = harvest_to_store(ds, lm, tmp_path / "store", sites=["embed"], contexts_per_shard=32,
                         batch_contexts=8, dtype="bfloat16", provenance={"model": "ids"})
    assert m["bos_id"] == 1 and m["ctx_len"] == CTX and m["n_contexts"] == len(ds)
    assert m["provenance"] == {"model": "ids", "tokens": {
        "path": os.path.abspath(tmp_path / "tokens"),
        "manifest_sha256": sha256_file(str(tmp_path / "tokens" / "manifest.json"))}}
    tokens = ds.take(np.arange(len(ds)))
    src = ActivationStore(tmp_path / "store", "embed")
    np.testing.assert_array_equal(src.gather(np.arange(src.n_rows))[:, 0],
                                  tokens[tokens != 1].astype(np.float32))
    assert all(t.shape == (8, CTX) for t in seen), "one shape: short batches are padded"


# -- reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_proc", [1, 2, 4])
def test_process_split_covers_each_row_once_per_epoch(store_f32, n_proc):
    src = ActivationStore(store_f32, SITES[1], seed=3)
    n, batch = src.n_rows, 16
    steps = -(-2 * n // batch)  # two epochs and a bit; batches straddle epoch boundaries
    ids = np.concatenate([
        np.concatenate([src.table_rows(s, p * batch // n_proc, (p + 1) * batch // n_proc, batch)
                        for p in range(n_proc)]) for s in range(steps)])
    for e in range(2):
        assert sorted(ids[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n:2 * n]), "each epoch has its own order"
    epoch_rows = np.concatenate([
        np.concatenate([host_rows(src, s, batch, p, n_proc) for p in range(n_proc)])
        for s in range(steps)])[:n]
    whole = src.gather(np.arange(n))
    np.testing.assert_array_equal(sorted_rows(epoch_rows), sorted_rows(whole))
    for s in (0, 5, steps - 1):  # process slices concatenate to the global batch, bit for bit
        parts = np.concatenate([host_rows(src, s, batch, p, n_proc) for p in range(n_proc)])
        assert parts.tobytes() == src.rows(s, 0, batch, batch).tobytes()
        assert np.concatenate([src.rows(s, 0, 7, batch), src.rows(s, 7, batch, batch)]
                              ).tobytes() == parts.tobytes()


def test_reader_is_deterministic_and_samples(store_f32):
    a, b = ActivationStore(store_f32, SITES[0], seed=1), ActivationStore(store_f32, SITES[0],
                                                                         seed=1)
    assert a.rows(7, 0, 32, 32).tobytes() == b.rows(7, 0, 32, 32).tobytes()
    assert not np.array_equal(a.rows(7, 0, 32, 32),
                              ActivationStore(store_f32, SITES[0], seed=2).rows(7, 0, 32, 32))
    s = a.sample(50, seed=4)
    assert s.shape == (50, D_RESID) and s.dtype == np.float32
    assert s.tobytes() == b.sample(50, seed=4).tobytes()
    assert not np.array_equal(s, a.sample(50, seed=5))
    with pytest.raises(ValueError, match="batch_size"):
        a.rows(0, 0, 8, 4)


def test_reader_names_the_site(store_f32):
    with pytest.raises(ValueError, match="2 sites"):
        ActivationStore(store_f32)
    with pytest.raises(ValueError, match="no site 'blocks.9'.*hook_resid_post"):
        ActivationStore(store_f32, "blocks.9")


def test_missing_truncated_and_corrupt_shards(ctx, tmp_path):
    harvest(ctx, tmp_path, sites=SITES[:1])
    shard = tmp_path / SITES[0] / "acts_00002.npy"
    data = shard.read_bytes()
    os.remove(shard)
    with pytest.raises(ValueError, match=r"acts_00002\.npy: shard listed in manifest.json is "
                                         r"missing"):
        ActivationStore(tmp_path)
    shard.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"acts_00002\.npy: cannot be memory-mapped"):
        ActivationStore(tmp_path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    src = ActivationStore(tmp_path)  # same shape: opening cannot tell
    with pytest.raises(ValueError, match=r"acts_00002\.npy: checksum mismatch"):
        src.verify()
    shard.write_bytes(data)
    ActivationStore(tmp_path).verify()
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ActivationStore(tmp_path)


def test_jitted_bfloat16_forward(ctx, tmp_path):
    """The real use: a jitted forward returning bfloat16 jax arrays (dispatched ahead)."""
    import jax
    import jax.numpy as jnp

    lm = FakeLM()
    emb, pos = jnp.asarray(lm.emb, jnp.bfloat16), jnp.asarray(lm.pos, jnp.bfloat16)
    fwd = jax.jit(lambda t: {"resid": jnp.tanh(emb[t] + pos[None])})
    harvest(ctx, tmp_path, lm=fwd, sites=["resid"], dtype="bfloat16")
    want = np.asarray(fwd(ctx.tokens)["resid"]).reshape(-1, D_RESID)[ctx.tokens.reshape(-1) != BOS]
    src = ActivationStore(tmp_path)
    assert src.gather(np.arange(src.n_rows)).tobytes() == want.astype(np.float32).tobytes()


def test_config_source_store_serves_the_store_and_trains(tmp_path):
    """data.source=store goes through make_source to the same rows, and a short real training
    run reads from it; a missing store is a config error naming the data source."""
    from saejax.config import ConfigError, load_config
    from saejax.data import make_source
    from saejax.train.loop import train

    harvest_to_store(Contexts(24), FakeLM(), tmp_path / "store", sites=SITES, contexts_per_shard=8,
                     batch_contexts=4)
    cfg = load_config(None, [
        "data.source=store", f"data.store_path={tmp_path / 'store'}", f"data.site={SITES[1]}",
        f"sae.d_in={D_MLP}", "sae.n_features=32", "train.batch_size=16", "train.steps=20",
        "train.log_every=10", "train.checkpoint_every=20", f"train.run_dir={tmp_path / 'run'}",
        "train.progress=false", "mesh.data=4", "mesh.model=2"])
    src = make_source(cfg)
    np.testing.assert_array_equal(src.rows(3, 0, 16, 16),
                                  ActivationStore(tmp_path / "store", SITES[1]).rows(3, 0, 16, 16))
    summary = train(cfg, quiet=True)
    assert summary["step"] == 20 and np.isfinite(summary["fvu"])
    cfg.data.store_path = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.source=store: .*nowhere"):
        make_source(cfg)
