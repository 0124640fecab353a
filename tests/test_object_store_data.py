"""Token datasets and activation stores in a bucket (a real S3 server, moto on 127.0.0.1): written
there object by object with the manifest last, resumed there after a crash, and read back by
byte ranges bitwise equal to the same data written and memory-mapped locally; damage to an
object is named by its URL."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from saejax.atomic import MANIFEST, MARKER
from saejax.data.npy import NpySource
from saejax.data.store import ActivationStore
from saejax.data.store_writer import PROGRESS, harvest_to_store
from saejax.files import absolute_path, expand_paths, resolve_data_path
from saejax.objstore import MAX_GAP, RangeNpy, open_npys
from saejax.paths import as_path
from saejax.text.corpus import Corpus
from saejax.text.tokenize import tokenize
from saejax.text.tokens import TokenDataset

from test_store import KW, SITES, Contexts, FakeLM  # tests/test_store.py

TEXT = "\n\n".join(f"paragraph {i}: the quick brown fox jumps over {i % 7} lazy dogs."
                   for i in range(120))


def upload_tree(local: Path, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            as_path(f"{url}/{p.relative_to(local).as_posix()}").write_bytes(p.read_bytes())


def objects(s3_server, url: str) -> dict[str, bytes]:
    """{key relative to url: bytes} of every object under url."""
    prefix = url[len("s3://"):].partition("/")[2]
    bucket = url[len("s3://"):].partition("/")[0]
    return {k[len(prefix) + 1:]: as_path(f"s3://{bucket}/{k}").read_bytes()
            for k in s3_server.keys(url)}


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_tokenize_into_a_bucket_equals_the_local_dataset(s3_server, tmp_path):
    bucket = s3_server.bucket()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(TEXT)
    as_path(f"{bucket}/corpus/a.txt").write_text(TEXT)
    kw = dict(train_bpe=300, ctx_len=16, bos="every_context")
    local, _ = tokenize(Corpus([str(tmp_path / "corpus" / "*.txt")], separator=""),
                        tmp_path / "tokens", **kw)
    remote, tok_dir = tokenize(Corpus([f"{bucket}/corpus/*.txt"], separator=""),
                               f"{bucket}/tokens", **kw)  # text read from the bucket too
    assert tok_dir == f"{bucket}/tokens-tokenizer"
    keys = s3_server.keys(bucket)
    assert f"{bucket[5:]}/tokens/{MANIFEST}" in [f"{bucket[5:]}/{k}" for k in keys]
    assert not [k for k in keys if k.endswith((MARKER, ".tmp"))], "no work objects left"
    assert "tokens-tokenizer/tokenizer.json" in keys

    n = len(local)
    assert len(remote) == n > 20 and [s["sha256"] for s in remote.manifest["shards"]] == \
        [s["sha256"] for s in local.manifest["shards"]]
    assert objects(s3_server, f"{bucket}/tokens")["tokens_00000.npy"] == \
        (tmp_path / "tokens" / "tokens_00000.npy").read_bytes()
    idx = np.random.default_rng(0).integers(0, n, 50)
    np.testing.assert_array_equal(remote.take(idx), local.take(idx))
    np.testing.assert_array_equal(remote[n - 1], local[n - 1])
    remote.verify()

    # replaced whole with overwrite (staged locally, uploaded manifest last)
    again, _ = tokenize(Corpus([f"{bucket}/corpus/*.txt"], separator=""), f"{bucket}/tokens",
                        tokenizer=str(tmp_path / "tokens-tokenizer"), ctx_len=16,
                        max_contexts=10, overwrite=True)
    assert len(again) == 10 and len(TokenDataset(f"{bucket}/tokens")) == 10
    with pytest.raises(FileExistsError, match=f"{bucket}/tokens already holds a complete"):
        tokenize(Corpus([f"{bucket}/corpus/*.txt"], separator=""), f"{bucket}/tokens", **kw)


@pytest.fixture(scope="module")
def ctx():
    return Contexts(47)


def test_store_in_a_bucket_serves_the_local_rows(s3_server, ctx, tmp_path):
    url = f"{s3_server.bucket()}/store"
    harvest_to_store(ctx, FakeLM(), tmp_path, **KW, provenance={"model": "fake"})
    m = harvest_to_store(ctx, FakeLM(), url, **KW, provenance={"model": "fake"})
    assert objects(s3_server, url) == local_files(tmp_path), "the same objects, byte for byte"

    local, remote = ActivationStore(tmp_path, SITES[1]), ActivationStore(url, SITES[1])
    assert remote.manifest == local.manifest == m
    assert all(isinstance(s, RangeNpy) for s in remote._shards)
    for step in range(4):  # shuffled batches spanning every shard, and per-process slices
        for a, b in [(0, 64), (16, 48)]:
            got, want = remote.rows(step, a, b, 64), local.rows(step, a, b, 64)
            assert got.tobytes() == want.tobytes()
    assert remote.sample(100, 3).tobytes() == local.sample(100, 3).tobytes()
    remote.verify()

    shard = f"{url}/{SITES[1]}/acts_00002.npy"
    data = as_path(shard).read_bytes()
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    as_path(shard).write_bytes(bytes(flipped))  # same size: only the checksum can tell
    with pytest.raises(ValueError) as e:
        ActivationStore(url, SITES[1]).verify()
    assert str(e.value).startswith(f"{shard}: checksum mismatch") and "\n" not in str(e.value)
    as_path(shard).write_bytes(data[:-100])
    with pytest.raises(ValueError, match=f"{shard}: cannot be read as a .npy array, truncated"):
        ActivationStore(url, SITES[1])
    as_path(shard).unlink()
    with pytest.raises(ValueError, match=f"{shard}: shard listed in {MANIFEST} is missing"):
        ActivationStore(url, SITES[1])
    as_path(f"{url}/{MANIFEST}").unlink()
    with pytest.raises(ValueError, match=f"{url} is not an activation store: no {MANIFEST}"):
        ActivationStore(url)


def test_cache_dir_serves_checked_local_copies(s3_server, ctx, tmp_path, monkeypatch):
    """With SAEJAX_CACHE_DIR a store at a URL is downloaded once, checked against its manifest,
    and memory-mapped: the same rows; a shard corrupted in the bucket is never used."""
    url = f"{s3_server.bucket()}/store"
    harvest_to_store(ctx, FakeLM(), tmp_path / "local", **KW, provenance={"model": "fake"})
    harvest_to_store(ctx, FakeLM(), url, **KW, provenance={"model": "fake"})
    monkeypatch.setenv("SAEJAX_CACHE_DIR", str(tmp_path / "cache"))
    local, cached = ActivationStore(tmp_path / "local", SITES[1]), ActivationStore(url, SITES[1])
    assert all(isinstance(s, np.memmap) for s in cached._shards)
    assert cached.rows(3, 0, 64, 64).tobytes() == local.rows(3, 0, 64, 64).tobytes()
    shard = f"{url}/{SITES[1]}/acts_00001.npy"
    as_path(shard).unlink()  # the checked copy serves without the bucket's
    assert ActivationStore(url, SITES[1]).rows(3, 0, 64, 64).tobytes() == \
        local.rows(3, 0, 64, 64).tobytes()

    data = (tmp_path / "local" / SITES[1] / "acts_00001.npy").read_bytes()
    as_path(shard).write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # corrupt, uncached
    for f in (tmp_path / "cache").rglob("acts_00001.npy*"):
        f.unlink()
    with pytest.raises(ValueError) as e:
        ActivationStore(url, SITES[1])
    assert str(e.value).startswith(f"{shard}: checksum mismatch") and "\n" not in str(e.value)


def test_lm_harvest_from_and_into_a_bucket(s3_server, tiny_world):
    """The command's path: a real LM over a token dataset read from the bucket, into the bucket;
    the same shards, byte for byte, as the tiny world's local store."""
    from saejax.data.harvest import harvest
    from tiny_world import SITE

    bucket = s3_server.bucket()
    upload_tree(tiny_world.tokens, f"{bucket}/tokens")
    m = harvest(tiny_world.lm, f"{bucket}/tokens", f"{bucket}/store", [SITE], progress=False)
    local = ActivationStore(tiny_world.store)
    assert m["sites"] == local.manifest["sites"]
    assert m["provenance"]["tokens"]["path"] == f"{bucket}/tokens"
    assert m["provenance"]["model"] == str(tiny_world.lm) and "model_relative" not in \
        m["provenance"]
    remote = ActivationStore(f"{bucket}/store")
    for step in range(3):
        assert remote.rows(step, 0, 128, 128).tobytes() == local.rows(step, 0, 128, 128).tobytes()


def test_interrupted_harvest_into_a_bucket_resumes(s3_server, ctx, tmp_path):
    url = f"{s3_server.bucket()}/store"
    harvest_to_store(ctx, FakeLM(), tmp_path, **KW, provenance={"model": "fake"})
    with pytest.raises(RuntimeError, match="simulated crash"):  # in the 3rd of 5 shards
        harvest_to_store(ctx, FakeLM(fail_after=8), url, **KW, provenance={"model": "fake"})
    names = set(objects(s3_server, url))
    assert {MARKER, PROGRESS} <= names and MANIFEST not in names
    with pytest.raises(ValueError, match="interrupted"):
        ActivationStore(url, SITES[0])
    # what a kill between a shard's upload and its progress line leaves: an unrecorded shard
    as_path(f"{url}/{SITES[0]}/acts_00002.npy").write_bytes(b"not recorded")

    lm = FakeLM()
    harvest_to_store(ctx, lm, url, **KW, provenance={"model": "fake"})
    assert lm.calls == 3 * 2 + 2, "shards 2 and 3 (3 batches each) and 4 (2 batches) only"
    assert objects(s3_server, url) == local_files(tmp_path), "same bytes as uninterrupted"


def test_range_reads_match_the_memory_map(s3_server, tmp_path):
    url = s3_server.bucket()
    arr = np.random.default_rng(0).normal(size=(300, 7)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    upload_tree(tmp_path, url)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    (r,) = open_npys([f"{url}/a.npy"])
    assert (r.shape, r.dtype, len(r)) == (mm.shape, mm.dtype, 300)
    idx = np.array([5, 4, 4, 299, 0, 150, 151, 152, -1])
    for index in [idx, idx[:0], slice(10, 40, 3), 7, -2]:
        assert np.asarray(r[index]).tobytes() == np.asarray(mm[index]).tobytes()
    assert np.asarray(r).tobytes() == arr.tobytes()
    with pytest.raises(IndexError, match="row 300 is outside"):
        r[np.array([300])]
    # rows are read in ranges, bridging the smallest gaps within SLACK x the bytes asked for
    wide = RangeNpy(f"{url}/w.npy", np.dtype(np.float32), (5000, 1024), 128)  # 4 KiB rows
    _, _, first, end = wide._plan(np.array([10, 0, 1, 2, 500]))
    assert (list(first), list(end)) == ([0, 500], [11, 501]), "7 rows bridged, 489 not"
    g = MAX_GAP // 4096  # and never more than MAX_GAP
    _, _, first, end = wide._plan(np.r_[np.arange(1000), 1000 + g, 1002 + 2 * g])
    assert (list(first), list(end)) == ([0, 1002 + 2 * g], [1001 + g, 1003 + 2 * g])
    missing, = open_npys([f"{url}/nothing.npy"])
    assert isinstance(missing, FileNotFoundError)

    # NpySource over a URL glob: the same rows as over the local files
    np.save(tmp_path / "b.npy", arr[:50] * 2)
    upload_tree(tmp_path, url)
    src, want = NpySource(f"{url}/*.npy"), NpySource(str(tmp_path / "*.npy"))
    assert src.paths == [f"{url}/a.npy", f"{url}/b.npy"]
    assert src.rows(1, 0, 64, 64).tobytes() == want.rows(1, 0, 64, 64).tobytes()


def test_paths_accept_urls(s3_server):
    url = s3_server.bucket()
    for key in ["d/x.npy", "d/y.npy", "d/sub/z.npy", "d/notes.txt"]:
        as_path(f"{url}/{key}").write_bytes(b"1")
    assert expand_paths(f"{url}/d/*.npy") == [f"{url}/d/x.npy", f"{url}/d/y.npy"]
    assert expand_paths([f"{url}/d/**/*.npy", f"{url}/d/notes.txt"]) == \
        [f"{url}/d/sub/z.npy", f"{url}/d/x.npy", f"{url}/d/y.npy", f"{url}/d/notes.txt"]
    with pytest.raises(ValueError, match=f"'{url}/d' is a directory"):
        expand_paths(f"{url}/d")
    with pytest.raises(ValueError, match=f"pattern '{url}/e/\\*' matches no files"):
        expand_paths(f"{url}/e/*")
    as_path(f"{url}/c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert list(Corpus([f"{url}/*.jsonl"])) == ["one", "two"]
    assert absolute_path(f"{url}/d") == f"{url}/d"
    assert resolve_data_path(f"{url}/gone", "/old/runs/r", "/new/runs/r") == f"{url}/gone"
    assert resolve_data_path("/old/data", f"{url}/runs/r", os.getcwd()) == "/old/data"
