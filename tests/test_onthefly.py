"""On-the-fly activation feed (saejax.data.onthefly) on fake CPU devices.

Most tests use a fake "LM" whose activation rows encode the token they were computed at, and
token datasets whose token ids encode (context, position): a served row then names the row of
the stream it came from. The LM tests use a tiny random GPT-2-style saejax LM.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saejax.config import MeshConfig
from saejax.data.onthefly import Geometry, OnTheFlyFeed, context_ids, make_feed
from saejax.lm import LM, LMConfig
from saejax.sharding import make_mesh

T, N, BOS = 8, 300, 0
B, BUF, V, LMB = 32, 256, 8, 16  # H = 128 rows per harvest, S = 4 steps per harvest
R = T - 1
GEOM = dict(batch_size=B, buffer_size=BUF, blocks=V, lm_batch_contexts=LMB)


def id_tokens(n=N, bos=True):
    """Token (i, p) = i*T + p + 1, position 0 = BOS when `bos`."""
    tok = (np.arange(n)[:, None] * T + np.arange(T)[None] + 1).astype(np.int32)
    if bos:
        tok[:, 0] = BOS
    return tok


def id_rows(params, tokens):
    """A fake LM: the row at (context, position) is [token, -token] (exact in float32)."""
    x = tokens.astype(jnp.float32)
    return jnp.stack([x, -x], axis=-1)


def mesh_of(n):
    return make_mesh(MeshConfig(data=n), devices=jax.devices()[:n])


def id_feed(n_dev=1, tokens=None, **kw):
    args = dict(GEOM, bos_id=BOS, seed=3)
    args.update(kw)
    return OnTheFlyFeed(id_rows, {}, id_tokens() if tokens is None else tokens, mesh_of(n_dev),
                        **args)


def served(feed, steps):
    return np.stack([np.asarray(feed.batch(s)) for s in steps])


def stream_ids(feed, rows):
    """Token ids of stream rows `rows` (the expected content of harvests)."""
    g = feed.geometry
    q, p = np.divmod(np.asarray(rows), g.rows_per_context)
    ctx = context_ids(q, feed.n_contexts, feed.seed, feed.shuffle_contexts)
    return ctx * T + p + g.drop + 1


# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize("shuffle", ["blocks", "global"])
def test_every_harvested_row_served_exactly_once(shuffle):
    feed = id_feed(shuffle=shuffle)
    g = feed.geometry
    S, H = g.steps_per_harvest, g.half
    assert (S, H, g.block_rows) == (4, 128, 16)
    # warm-up (S/2 steps) + 3 cycles: harvests 0, 1, 2 fully served, the first half of 3
    steps = S // 2 + 3 * S
    ids = served(feed, range(steps))[..., 0].astype(np.int64)
    assert ids.shape == (steps, B) and (ids[..., 0] != BOS).all()
    flat = ids.ravel()
    assert len(np.unique(flat)) == len(flat)  # nothing twice
    complete = stream_ids(feed, np.arange(3 * H))
    assert set(complete) <= set(flat)  # harvests 0..2: every row
    rest = set(flat) - set(complete)
    assert len(rest) == H // 2 and rest <= set(stream_ids(feed, np.arange(3 * H, 4 * H)))
    # each cycle's batches mix the two harvests half and half
    for s in range(S // 2, steps):
        c = g.newest(s)
        newer = np.isin(ids[s], stream_ids(feed, np.arange(c * H, (c + 1) * H)))
        assert newer.sum() == B // 2
    # the contexts of one batch are spread over the whole harvest, not one block
    ctx = (ids[S // 2 + S] - 1) // T
    assert len(np.unique(ctx)) > B // 3


def test_shuffle_is_a_permutation_and_mixes_blocks():
    feed = id_feed()
    g = feed.geometry
    feed.seek(0)
    slots = np.asarray(feed._st.slots)[..., 0]  # [2, H]: the buffer
    h0 = slots[0].astype(np.int64)
    assert sorted(h0) == sorted(stream_ids(feed, np.arange(g.half)))
    # block v of the harvest plan ran its own contexts; after the shuffle each block holds rows
    # from every block's contexts
    ids, _ = feed.plan(0)
    owner = {int(c): v for v in range(V) for c in ids[v]}
    for v in range(V):
        block = h0[v * g.block_rows:(v + 1) * g.block_rows]
        assert len({owner[int(c)] for c in (block - 1) // T}) >= V // 2


def test_deterministic_and_seeded():
    a = served(id_feed(), range(10))
    np.testing.assert_array_equal(a, served(id_feed(), range(10)))
    assert not np.array_equal(a, served(id_feed(seed=4), range(10)))
    feed = id_feed(shuffle_contexts=False)
    in_order = served(feed, range(2))[..., 0].astype(np.int64)
    # without context shuffling the warm-up serves the first contexts of the dataset
    assert ((in_order - 1) // T).max() <= feed.geometry.half // R
    assert Geometry(**GEOM, ctx_len=T, drop=1).contexts_per_block == 4  # 16 rows: 3 or 4 ctxs


@pytest.mark.parametrize("shuffle", ["blocks", "global"])
def test_same_batches_on_any_mesh(shuffle):
    ref = served(id_feed(1, shuffle=shuffle), range(12))
    for n in (4, 8):
        feed = id_feed(n, shuffle=shuffle)
        got = feed.batch(0)
        assert got.sharding.spec == jax.sharding.PartitionSpec("data", None)
        np.testing.assert_array_equal(ref, np.concatenate(
            [np.asarray(got)[None], served(feed, range(1, 12))]))


def test_epochs_wrap_around():
    import collections

    feed = id_feed(tokens=id_tokens(20))  # 140 rows per epoch, 128 per harvest
    H = feed.geometry.half
    ids = served(feed, range(2 + 4 * 3))[..., 0].astype(np.int64).ravel()
    extra = collections.Counter(ids) - collections.Counter(stream_ids(feed, np.arange(3 * H)))
    assert sum(extra.values()) == H // 2  # 3.2 epochs: the stream's rows, as many times
    assert len(np.unique(ids)) == 140


# ---------------------------------------------------------------- resume


def test_seek_resumes_identically():
    ref = served(id_feed(), range(16))
    for start in (0, 1, 2, 5, 6, 7, 10):  # warm-up, cycle starts (2, 6, 10) and mid-cycle
        feed = id_feed()
        np.testing.assert_array_equal(served(feed, range(start, 16)), ref[start:], err_msg=start)
    feed = id_feed()
    served(feed, range(3))
    np.testing.assert_array_equal(served(feed, range(9, 12)), ref[9:12])  # jump ahead
    np.testing.assert_array_equal(served(feed, range(4, 6)), ref[4:6])  # and back


def test_ordinary_steps_read_nothing_back():
    feed = id_feed(4)
    feed.batch(0)
    with jax.transfer_guard_device_to_host("disallow"):
        for s in range(1, 11):  # includes refills at steps 2, 6, 10
            feed.batch(s)


# ---------------------------------------------------------------- checks


def test_geometry_and_bos_checks():
    with pytest.raises(ValueError, match="multiple of 4\\*batch_size"):
        id_feed(buffer_size=BUF + 2 * B)
    with pytest.raises(ValueError, match="multiple of the mesh's data axis"):
        id_feed(8, blocks=4)
    with pytest.raises(ValueError, match="lm_batch_contexts=12"):
        id_feed(lm_batch_contexts=12)
    with pytest.raises(ValueError, match="blocks\\^2"):
        id_feed(buffer_size=4 * B, batch_size=B, blocks=16)
    with pytest.raises(ValueError, match="needs bos_id"):
        id_feed(bos_id=None)
    tok = id_tokens()
    tok[7, 0] = 5
    with pytest.raises(ValueError, match="context 7 starts with token 5, not BOS"):
        id_feed(tokens=tok, shuffle_contexts=False).batch(0)
    # drop_bos=False serves position 0 as well
    feed = id_feed(tokens=id_tokens(bos=False), drop_bos=False, bos_id=None)
    ids = served(feed, range(2))[..., 0].astype(np.int64).ravel()
    assert ((ids - 1) % T == 0).any()
    assert feed.describe()["drop_bos"] is False


# ---------------------------------------------------------------- a real LM


CFG = LMConfig(model_type="gpt2", vocab_size=97, d_model=16, n_layers=2, n_heads=4,
               n_kv_heads=4, d_head=4, d_mlp=32, act="relu", n_ctx=T, qkv_bias=True,
               attn_out_bias=True, mlp_bias=True, tied_embeddings=True)
SITE = "blocks.1.mlp.hook_post"


def tiny_lm() -> LM:
    """Random weights drawn with numpy into an abstract module (no init compile), scale 0.3."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LM(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    flat = [(p, v.replace(value=jnp.asarray(0.3 * rng.standard_normal(v.get_value().shape),
                                            jnp.float32)))
            for p, v in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def random_tokens(n=N):
    tok = np.random.default_rng(1).integers(1, CFG.vocab_size, (n, T)).astype(np.int32)
    tok[:, 0] = BOS
    return tok


def test_lm_rows_equal_run_with_cache():
    lm, tok = tiny_lm(), random_tokens()
    feed = OnTheFlyFeed.from_lm(lm, SITE, tok, mesh_of(4), **GEOM, bos_id=BOS, seed=3)
    assert feed.d_in == CFG.d_mlp
    steps = range(2 + 4)
    got = served(feed, steps)
    # where each row came from: the same schedule with the id "LM" (it does not depend on the LM)
    ids = served(id_feed(4, tokens=id_tokens()), steps)[..., 0].astype(np.int64) - 1
    ctx, pos = np.divmod(ids, T)
    ref = jax.jit(lambda t: lm.run_with_cache(t, [SITE])[1][SITE])(jnp.asarray(tok))
    np.testing.assert_allclose(got, np.asarray(ref)[ctx, pos], rtol=1e-5, atol=1e-6)
    assert np.abs(got).sum() > 0

    x = feed.sample(64, seed=5)
    assert x.shape == (64, CFG.d_mlp)
    assert x.sharding.spec == jax.sharding.PartitionSpec("data", None)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(feed.sample(64, seed=5)))
    rows = np.asarray(ref)[:, 1:].reshape(-1, CFG.d_mlp)
    hit = np.abs(np.asarray(x)[:, None, :] - rows[None]).max(-1).min(-1)
    assert hit.max() < 1e-5  # every sampled row is some (context, position > 0) row
    with pytest.raises(ValueError, match="multiple of the data axis"):
        feed.sample(63, seed=5)
    with pytest.raises(ValueError, match="not a hook site"):
        OnTheFlyFeed.from_lm(lm, "blocks.9.mlp.hook_post", tok, mesh_of(1), **GEOM, bos_id=BOS)


def test_make_feed_from_run_config(tmp_path):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from saejax.config import ConfigError
    from saejax.text.tokens import write_token_dataset

    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_layer=1, n_embd=16, n_head=4,
                                     n_positions=T, n_inner=32, activation_function="relu")
                       ).save_pretrained(tmp_path / "lm")

    class CharTokenizer:
        """Characters as ids; '^' (id 1) is BOS/EOS."""
        bos_token = eos_token = "^"
        bos_token_id = eos_token_id = 1
        name_or_path = "chars"

        def __len__(self):
            return 128

        def __call__(self, texts, **_):
            return {"input_ids": [[min(ord(c), 127) for c in t] for t in texts]}

    docs = [f"document number {i} says hello" for i in range(60)]
    write_token_dataset(docs, CharTokenizer(), tmp_path / "tokens", ctx_len=T)
    data = types.SimpleNamespace(
        lm_path=str(tmp_path / "lm"), tokens_path=str(tmp_path / "tokens"),
        site="blocks.0.mlp.hook_post", buffer_size=BUF, buffer_blocks=V, lm_batch_contexts=LMB,
        drop_bos=True, shuffle_contexts=True, seed=0, lm_dtype="float32")
    cfg = types.SimpleNamespace(data=data, train=types.SimpleNamespace(batch_size=B),
                                sae=types.SimpleNamespace(d_in=32))
    feed = make_feed(cfg, mesh_of(2))
    assert feed.bos_id == 1 and feed.d_in == 32
    batches = feed.batches(0, 3)
    assert [batches.next().shape for _ in range(3)] == [(B, 32)] * 3
    with pytest.raises(StopIteration):
        batches.next()
    cfg.sae.d_in = 16
    with pytest.raises(ConfigError, match="sae.d_in=16"):
        make_feed(cfg, mesh_of(2))
    cfg.sae.d_in = 32
    cfg.data = types.SimpleNamespace(**{**vars(data), "buffer_size": BUF + 1})
    with pytest.raises(ConfigError, match="data.source=lm: buffer_size"):
        make_feed(cfg, mesh_of(2))
