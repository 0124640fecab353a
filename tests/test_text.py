"""Text to tokens: corpus readers, the offline byte-level BPE, packing rules, token shards."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from saejax.text.corpus import Corpus, iter_hf_dataset, split_documents
from saejax.text.tokenizer import ENDOFTEXT, encode_batch, load_tokenizer, train_bpe
from saejax.text.tokens import (MANIFEST, MARKER, Packer, TokenDataset, pack_contexts,
                                token_dtype, write_token_dataset)

# A few KB of mixed-script text: English dominates, with Arabic, Cyrillic and CJK lines.
MIXED = """\
The quick brown fox jumps over the lazy dog. The dog does not mind.
Sparse autoencoders decompose activations into interpretable features.
A feature that fires on Arabic script is a good test of the dictionary.
It was the best of times, it was the worst of times, it was the age of wisdom.
Tabs\tand  double  spaces, trailing spaces   and "quotes" (parentheses) [brackets].
بسم الله الرحمن الرحيم. الحمد لله رب العالمين.
اللغة العربية جميلة، وهي تكتب من اليمين إلى اليسار.
هذا نص قصير باللغة العربية لاختبار المرمز.
Съешь же ещё этих мягких французских булок, да выпей чаю.
В начале было Слово, и Слово было у Бога.
Разреженные автокодировщики разлагают активации на признаки.
天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。
学而时习之，不亦说乎？有朋自远方来，不亦乐乎？
稀疏自编码器把激活分解成可解释的特征。
いろはにほへと　ちりぬるを。日本語の文も少し入れておく。
Numbers 0123456789, symbols #$%&*+-=/<>@^_`{|}~ and an emoji 🤖.
"""
CORPUS_DOCS = [line for _ in range(6) for line in MIXED.splitlines()]
UNSEEN = [  # not in the training text: byte-level BPE must still round-trip them exactly
    "Entirely new English sentence, with punctuation!?",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Привет, мир! Как дела сегодня?",
    "你好，世界。今天天气很好。",
    "  leading spaces,\n\nnewlines\r\n and\ttabs  ",
    "ελληνικά, עברית, हिन्दी, 한국어, emoji 🧪🔬",
    "",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained on the mixed corpus, loaded back through AutoTokenizer."""
    out = tmp_path_factory.mktemp("bpe")
    tok = train_bpe(CORPUS_DOCS, vocab_size=600, out_dir=out)
    return out, tok


# -- corpus -------------------------------------------------------------------------------------


def test_split_documents_on_separator_lines():
    text = "%\nfirst\nfortune\n%\n%\n  second\n\n%  \r\nthird\r\n%\n\n"
    assert list(split_documents(text, "%")) == ["first\nfortune", "  second", "third"]
    paras = "\n\npara one\nline two\n\n\n\npara two\n   \npara three\n"
    assert list(split_documents(paras, "")) == ["para one\nline two", "para two", "para three"]
    assert list(split_documents("\n whole file\n\nstays one\n\n", None)) == \
        [" whole file\n\nstays one"]
    assert list(split_documents("\n\n  \n", None)) == []
    # form feeds and Unicode line separators are content, not line breaks
    assert list(split_documents("a\x0cb\u2028c\n%\nd", "%")) == ["a\x0cb\u2028c", "d"]


def test_corpus_files_globs_and_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n\nsecond bee\n")
    (tmp_path / "a.txt").write_text("ay\n")
    (tmp_path / "sub" / "c.txt").write_text("sea\n")
    (tmp_path / "fortunes").write_text("%\n\x1b[31mred\x1b[0m fortune\n%\nplain\n%\n")
    (tmp_path / "d.jsonl").write_text('{"text": "jay one"}\n\n{"text": "jay two", "id": 2}\n')
    c = Corpus(paths=[str(tmp_path / "**" / "*.txt"), str(tmp_path / "d.jsonl")],
               separator="")
    expected = ["ay", "bee", "second bee", "sea", "jay one", "jay two"]
    assert list(c) == expected and list(c) == expected  # sorted matches; re-iterable
    assert list(Corpus(paths=c.paths, separator="", max_documents=3)) == expected[:3]
    assert c.describe()["n_files"] == 4
    f = Corpus(paths=str(tmp_path / "fortunes"), separator="%", strip_ansi=True)
    assert list(f) == ["red fortune", "plain"]
    custom = tmp_path / "custom.jsonl"
    custom.write_text('{"body": "x", "text": 1}\n')
    assert list(Corpus(paths=[str(custom)], text_field="body")) == ["x"]
    with pytest.raises(ValueError, match="matches no files"):
        list(Corpus(paths=[str(tmp_path / "*.md")]))
    with pytest.raises(ValueError, match="is a directory"):
        list(Corpus(paths=[str(tmp_path / "sub")]))
    (tmp_path / "fortunes.dat").write_bytes(b"\x00\x00\x00\x02\xff\xfe\x80")
    with pytest.raises(ValueError, match=r"fortunes\.dat: not valid utf-8 text at byte 4"):
        list(Corpus(paths=[str(tmp_path / "fortunes*")], separator="%"))
    with pytest.raises(ValueError, match="either files"):
        Corpus(paths=["x"], hf_name="y")


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "not valid JSON"),
    ('{"body": "no text field"}', "record has no 'text' field"),
    ('{"text": ["a", "list"]}', "field 'text' is a list, expected a string"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + '\n{"text": "after"}\n')
    docs = iter(Corpus(paths=[str(path)]))
    assert next(docs) == "fine"  # errors surface where the bad line is, not before
    with pytest.raises(ValueError) as e:
        next(docs)
    assert f"{path}:3: " in str(e.value) and message in str(e.value)


def test_hf_dataset_is_optional_and_lazy(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "one"}, {"text": "two"}, {"content": "three"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = iter(Corpus(hf_name="org/corpus", hf_config="en", split="validation"))
    assert [next(docs), next(docs)] == ["one", "two"]
    assert calls == [("org/corpus", "en", "validation", True)]
    with pytest.raises(ValueError, match=r"'org/corpus' \(en\) split 'validation', row 2: record has "
                                         r"no 'text' field"):
        next(docs)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="optional `datasets` package"):
        list(iter_hf_dataset("org/corpus"))
    # importing saejax.text pulls in neither datasets nor transformers
    code = ("import sys, saejax.text; "
            "assert not {'datasets', 'transformers', 'tokenizers'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- tokenizer ----------------------------------------------------------------------------------


def test_bpe_loads_with_autotokenizer_and_round_trips(bpe):
    from transformers import AutoTokenizer

    out, tok = bpe
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.is_fast and tok.is_fast
    assert loaded.bos_token == loaded.eos_token == ENDOFTEXT
    assert loaded.bos_token_id == loaded.eos_token_id == 0
    assert 300 < len(loaded) <= 600  # merges learned, capped at vocab_size
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    for text in list(dict.fromkeys(CORPUS_DOCS)) + UNSEEN:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ENDOFTEXT not in loaded.convert_ids_to_tokens(ids)  # nothing added by itself
        assert loaded.decode(ids) == text, text
        assert encode_batch(loaded, [text])[0] == ids  # the packer's fast path agrees
    # merges were learned for every script, so common words are not spelled byte by byte
    for word in ["features", "العربية", "Слово", "不亦"]:
        assert len(loaded(word, add_special_tokens=False)["input_ids"]) < len(word.encode())
    with pytest.raises(ValueError, match="cannot load a tokenizer from local directory"):
        load_tokenizer(out / "..")
    with pytest.raises(ValueError, match="is not among special_tokens"):
        train_bpe(["x"], 300, out / "bad", bos_token="<s>")


# -- packing ------------------------------------------------------------------------------------

BOS, SEP = 1, 2


def crafted_docs(seed: int) -> list[np.ndarray]:
    """Documents of random lengths (0 included, some longer than a context) whose token ids
    are all distinct and above the special ids, so every token identifies itself."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice([0, 1, 2, 3, 5, 8, 13, 40], size=int(rng.integers(1, 30)))
    starts = 10 + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [np.arange(s, s + n) for s, n in zip(starts, lengths)]


@pytest.mark.parametrize("bos", ["every_context", "document", "none"])
@pytest.mark.parametrize("ctx_len", [2, 3, 7, 16])
@pytest.mark.parametrize("sep", [SEP, None])
def test_packing_rules(bos, ctx_len, sep):
    for seed in range(12):
        docs = crafted_docs(seed)
        nonempty = [d for d in docs if len(d)]
        ctx = pack_contexts(docs, ctx_len, bos, bos_id=BOS, sep_id=sep)
        assert ctx.shape[1] == ctx_len and ctx.dtype == np.int64
        # the running stream the mode defines (module docstring of saejax.text.tokens)
        stream: list[int] = []
        for i, d in enumerate(nonempty):
            if bos == "document":
                stream.append(BOS)
            elif i and sep is not None:
                stream.append(SEP)
            stream.extend(d.tolist())
        body = ctx[:, 1:] if bos == "every_context" else ctx
        if bos == "every_context":
            assert (ctx[:, 0] == BOS).all()
        flat = body.reshape(-1)
        assert flat.tolist() == stream[:len(flat)]  # contexts are consecutive stream slices
        dropped = len(stream) - len(flat)
        assert 0 <= dropped < body.shape[1]  # only the last partial context is dropped
        # every document token appears exactly once, in order, up to the dropped tail
        all_tokens = np.concatenate(docs)
        kept = flat[flat >= 10]
        assert kept.tolist() == all_tokens[:len(kept)].tolist()
        assert len(all_tokens) - len(kept) <= dropped
        # BOS exactly where the mode puts it; SEP exactly between documents
        positions = np.flatnonzero(ctx.reshape(-1) == BOS)
        if bos == "every_context":
            assert positions.tolist() == list(range(0, ctx.size, ctx_len))
        elif bos == "document":
            starts = np.cumsum([0] + [len(d) + 1 for d in nonempty])[:-1]
            assert positions.tolist() == [s for s in starts if s < len(flat)]
        else:
            assert len(positions) == 0
        if bos == "document" or sep is None:
            assert not (ctx == SEP).any()
        # fed one document at a time, the packer gives the same contexts and reports the tail
        packer = Packer(ctx_len, bos, BOS, sep)
        pieces = [packer.add(d) for d in docs]
        assert np.array_equal(np.concatenate(pieces), ctx) and packer.tail == dropped


def test_packing_validation():
    with pytest.raises(ValueError, match="ctx_len must be >= 2"):
        Packer(1, "every_context", BOS)
    with pytest.raises(ValueError, match="needs a BOS token id"):
        Packer(8, "document", None)
    with pytest.raises(ValueError, match="bos must be one of"):
        Packer(8, "first", BOS)
    assert pack_contexts([], 4, "none").shape == (0, 4)
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


# -- token shards -------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shards_and_manifest_round_trip(bpe, tmp_path):
    out, tok = bpe
    docs = Corpus(paths=[str(tmp_path / "corpus.txt")], separator="")
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS_DOCS * 2))
    ds = write_token_dataset(docs, tok, tmp_path / "ds", ctx_len=16, bos="every_context",
                             contexts_per_shard=7, batch_documents=5)
    expected = pack_contexts(encode_batch(tok, list(docs)), 16, "every_context",
                             bos_id=tok.bos_token_id, sep_id=tok.eos_token_id)
    m = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert m["n_contexts"] == len(ds) == len(expected) > 14
    assert (m["ctx_len"], m["dtype"], m["bos"], m["bos_id"]) == (16, "uint16", "every_context", 0)
    assert m["tokenizer"] == {"name_or_path": str(out), "vocab_size": len(tok),
                              "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT}
    assert m["source"]["paths"] == docs.paths and m["n_documents"] == len(CORPUS_DOCS) * 2
    assert 0 <= m["dropped_tail_tokens"] < 15 and not m["stopped_at_max_contexts"]
    assert [s["rows"] for s in m["shards"]][:-1] == [7] * (len(m["shards"]) - 1)
    assert sum(s["rows"] for s in m["shards"]) == m["n_contexts"]
    for s in m["shards"]:
        arr = np.load(tmp_path / "ds" / s["file"])
        assert arr.dtype == np.uint16 and arr.shape == (s["rows"], 16)
        assert sha256(tmp_path / "ds" / s["file"]) == s["sha256"]
    assert sorted(os.listdir(tmp_path / "ds")) == sorted([MANIFEST] +
                                                         [s["file"] for s in m["shards"]])
    ds.verify()
    assert np.array_equal(ds.take(np.arange(len(ds))), expected)
    order = np.array([len(ds) - 1, 0, 8, 7, 6, 8])  # across shard boundaries, repeats, any order
    got = ds.take(order)
    assert got.dtype == np.int32 and np.array_equal(got, expected[order])
    assert np.array_equal(ds[9], expected[9]) and np.array_equal(list(ds)[-1], expected[-1])
    with pytest.raises(IndexError, match="outside"):
        ds.take([0, len(ds)])
    # the text survives: decoding the stream (without the per-context BOS) gives the documents
    text = tok.decode(expected[:, 1:].reshape(-1))
    assert text.startswith(ENDOFTEXT.join(CORPUS_DOCS[:3]))
    # how documents are batched for the tokenizer does not change a byte
    again = write_token_dataset(docs, tok, tmp_path / "ds2", ctx_len=16, contexts_per_shard=7,
                                batch_documents=1000)
    assert again.manifest["shards"] == m["shards"]
    # max_contexts: a fixed-size prefix
    cut = write_token_dataset(docs, tok, tmp_path / "ds3", ctx_len=16, contexts_per_shard=4,
                              max_contexts=10)
    assert len(cut) == 10 and cut.manifest["stopped_at_max_contexts"]
    assert np.array_equal(cut.take(range(10)), expected[:10])
    with pytest.raises(ValueError, match="fewer than one context"):
        write_token_dataset(["tiny"], tok, tmp_path / "ds4", ctx_len=64)


class WideTokenizer:
    """A slow (non-Rust) tokenizer with a 70,000-token vocabulary: ids need uint32."""
    bos_token, eos_token, bos_token_id, eos_token_id = "<s>", "</s>", 69_999, 69_998
    name_or_path = "wide"

    def __len__(self):
        return 70_000

    def __call__(self, texts, add_special_tokens, return_attention_mask):
        assert not add_special_tokens
        return {"input_ids": [[60_000 + ord(c) for c in t] for t in texts]}


def test_wide_vocabulary_uses_uint32(tmp_path):
    ds = write_token_dataset(["abcdefg", "hi"], WideTokenizer(), tmp_path, ctx_len=4,
                             bos="document")
    assert ds.dtype == np.uint32 and ds.manifest["sep_id"] is None
    assert ds.take([0, 1]).tolist() == [[69_999] + [60_000 + ord(c) for c in "abc"],
                                        [60_000 + ord(c) for c in "defg"]]
    assert len(ds) == 2 and ds.manifest["dropped_tail_tokens"] == 3  # BOS h i


def small_dataset(tok, path: Path, **kw) -> TokenDataset:
    return write_token_dataset(CORPUS_DOCS, tok, path, ctx_len=8, contexts_per_shard=10, **kw)


def test_corrupt_or_missing_shards_are_named(bpe, tmp_path):
    _, tok = bpe
    ds = small_dataset(tok, tmp_path)
    shard = tmp_path / "tokens_00001.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of one token
    shard.write_bytes(bytes(data))
    reopened = TokenDataset(tmp_path)  # shape and dtype still fine: opening is cheap
    with pytest.raises(ValueError, match=r"tokens_00001\.npy: checksum mismatch"):
        reopened.verify()
    shard.write_bytes(bytes(data[:-5]))  # truncated
    with pytest.raises(ValueError, match=r"tokens_00001\.npy: cannot be memory-mapped"):
        TokenDataset(tmp_path)
    np.save(shard, np.zeros((10, 8), np.uint32))
    with pytest.raises(ValueError, match=r"tokens_00001\.npy: dtype uint32, manifest says uint16"):
        TokenDataset(tmp_path)
    np.save(shard, np.zeros((9, 8), np.uint16))
    with pytest.raises(ValueError, match=r"tokens_00001\.npy: shape \(9, 8\), manifest says "
                                         r"\(10, 8\)"):
        TokenDataset(tmp_path)
    shard.unlink()
    with pytest.raises(ValueError, match=r"tokens_00001\.npy: shard listed in manifest.json "
                                         r"is missing"):
        TokenDataset(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        TokenDataset(tmp_path)
    del ds


def test_interrupted_write_restarts_cleanly(bpe, tmp_path):
    _, tok = bpe
    reference = small_dataset(tok, tmp_path / "ref")

    def interrupted_docs():
        for i, doc in enumerate(CORPUS_DOCS):
            if i == 60:
                raise KeyboardInterrupt
            yield doc

    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        write_token_dataset(interrupted_docs(), tok, out, ctx_len=8, contexts_per_shard=10,
                            batch_documents=4)
    names = set(os.listdir(out))
    assert MARKER in names and MANIFEST not in names and "tokens_00000.npy" in names
    with pytest.raises(ValueError, match="not a token dataset: no manifest.json .*interrupted"):
        TokenDataset(out)
    (out / "tokens_00042.npy.tmp").write_bytes(b"half a shard")  # killed mid-shard, too
    resumed = small_dataset(tok, out)
    assert resumed.manifest["shards"] == reference.manifest["shards"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))
    # a complete dataset is not overwritten by accident ...
    with pytest.raises(FileExistsError, match="already holds a complete token dataset"):
        small_dataset(tok, out)
    # ... and overwriting drops the manifest first: a crash mid-way is not a dataset
    def crash_immediately():
        raise KeyboardInterrupt
        yield ""
    with pytest.raises(KeyboardInterrupt):
        write_token_dataset(crash_immediately(), tok, out, ctx_len=8, overwrite=True)
    assert set(os.listdir(out)) == {MARKER}
    replaced = small_dataset(tok, out, bos="none")
    assert replaced.bos == "none" and MARKER not in os.listdir(out)
    replaced.verify()
    # directories the writer did not make are never touched
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files a token dataset does not"):
        small_dataset(tok, foreign)
    (foreign / "notes.txt").unlink()
    np.save(foreign / "tokens_00000.npy", np.zeros((2, 8), np.uint16))
    with pytest.raises(FileExistsError, match="neither manifest.json nor the .incomplete"):
        small_dataset(tok, foreign)
    assert os.listdir(foreign) == ["tokens_00000.npy"]
