"""Script features: the token classifier on hand-written tokens and against Python's own UTF-8
decoder, and the streamed per-unit counters against brute-force numpy on the tiny world."""

import json
import unicodedata

import numpy as np
import pytest

from saejax.analysis.scripts import (ScriptOptions, analyse_scripts, format_report,
                                     plot_class_histogram, script_stats, unit_activations)
from saejax.lm.stream import site_batches
from saejax.text.labels import SCRIPT_RANGES, ScriptLabeler, byte_decoder, token_bytes

CLASSES = ("arabic", "cyrillic", "cjk", "latin", "hebrew", "greek")


# -- the classifier on hand-written tokens ------------------------------------------------------

VOCAB = {
    "<s>": b"", "al": "ال".encode(), "pe": "پ".encode(), "gaf": "گ".encode(),
    "fatha": "\u064e".encode(), "kot": "кот".encode(), "nihon": "日本".encode(),
    "hi": "ひ".encode(), "ka": "カ".encode(), "han": "한".encode(), "the": b" the",
    "e_acute": "é".encode(), "shalom": "שלום".encode(), "alpha": "α".encode(),
    "42": b"42", "ar_digit": "\u0663".encode(), "comma": b",", "ar_comma": "\u060c".encode(),
    "space": b" ", "mixed": "aب".encode(), "d8": b"\xd8", "a8": b"\xa8",
    "e6": b"\xe6", "97": b"\x97", "a5": b"\xa5", "e697": b"\xe6\x97", "a5e6": b"\xa5\xe6",
    "9cac": b"\x9c\xac", "d8a8": b"\xd8\xa8", "unknown": None,
}
NAMES = list(VOCAB)


@pytest.fixture(scope="module")
def hand():
    return ScriptLabeler(list(VOCAB.values()), CLASSES)


def classes_of(hand, *names):
    """Classes of each token of one context of the named tokens, plus flags."""
    lab = hand.label(np.array([[NAMES.index(n) for n in names]]))
    return [({c for c in CLASSES if lab.has(c)[0, i]}, bool(lab.fragment[0, i]),
             bool(lab.unresolved[0, i])) for i in range(len(names))]


@pytest.mark.parametrize("name, want", [
    ("al", {"arabic"}), ("pe", {"arabic"}), ("gaf", {"arabic"}),  # Persian letters are Arabic
    ("fatha", {"arabic"}),  # a combining mark counts
    ("kot", {"cyrillic"}), ("nihon", {"cjk"}), ("hi", {"cjk"}), ("ka", {"cjk"}),
    ("han", {"cjk"}), ("the", {"latin"}), ("e_acute", {"latin"}), ("shalom", {"hebrew"}),
    ("alpha", {"greek"}), ("42", set()), ("ar_digit", set()),  # digits are in no class
    ("comma", set()), ("ar_comma", set()), ("space", set()), ("<s>", set()),
    ("mixed", {"latin", "arabic"}),  # a mixed token is in every class it touches
])
def test_whole_tokens(hand, name, want):
    assert classes_of(hand, name) == [(want, False, False)]


def test_partial_utf8_is_classified_by_its_character(hand):
    # ب = D8 A8 split over two tokens: each half alone is a fragment, together Arabic.
    assert classes_of(hand, "d8") == [(set(), True, True)]
    assert classes_of(hand, "the", "d8", "a8", "al") == [
        ({"latin"}, False, False), ({"arabic"}, True, False), ({"arabic"}, True, False),
        ({"arabic"}, False, False)]
    # 日 = E6 97 A5 over three tokens; 日本 = E6 97 | A5 E6 | 9C AC: the middle token holds the
    # end of one character and the start of the next.
    assert [c for c, *_ in classes_of(hand, "e6", "97", "a5")] == [{"cjk"}] * 3
    assert classes_of(hand, "e697", "a5e6", "9cac") == [({"cjk"}, True, False)] * 3


def test_unresolvable_bytes_are_flagged_not_classified(hand):
    # Context starts mid-character / ends before the character does / bytes unknown.
    assert classes_of(hand, "a8", "al") == [(set(), True, True), ({"arabic"}, False, False)]
    assert classes_of(hand, "al", "d8") == [({"arabic"}, False, False), (set(), True, True)]
    assert classes_of(hand, "unknown", "al")[0] == (set(), False, True)
    # A lead cut short by a new lead: the cut character is bad, the next one is fine.
    assert classes_of(hand, "e6", "al") == [(set(), True, True), ({"arabic"}, False, False)]
    # A continuation byte beyond what the lead announced is bad on its own (as in Python's
    # decoder: b"\xd8\xa8\xa8" -> "ب\ufffd").
    assert classes_of(hand, "d8a8", "a8") == [({"arabic"}, False, False), (set(), True, True)]
    # Contexts are decoded separately: a character never spans two rows.
    lab = hand.label(np.array([[NAMES.index("the"), NAMES.index("d8")],
                               [NAMES.index("a8"), NAMES.index("the")]]))
    assert lab.unresolved.tolist() == [[False, True], [True, False]]


def test_ranges_are_disjoint_and_validated():
    seen = np.zeros(0x110000, int)
    for ranges in SCRIPT_RANGES.values():
        for lo, hi in ranges:
            seen[lo:hi + 1] += 1
    assert seen.max() == 1
    with pytest.raises(ValueError, match="klingon"):
        ScriptLabeler([b"a"], ("klingon",))
    with pytest.raises(ValueError, match="levels"):
        ScriptOptions(levels=(1.0, 2.0))
    with pytest.raises(ValueError, match="classes"):
        ScriptOptions(classes=("arabic", "klingon"))


# -- the tiny world -----------------------------------------------------------------------------


def reference_labels(tokenizer, contexts: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
    """[C, B, T] classes and [B, T] unresolved, by Python's UTF-8 decoder, a token at a time.

    Bytes come from the byte-level alphabet of each token's piece (not from decoding), each
    context is walked a character at a time, and each character is decoded by Python."""
    inv = byte_decoder()
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    tb = [b"" if i in special else bytes(inv[c] for c in p) for i, p in enumerate(pieces)]

    def cls_of(ch):
        if unicodedata.category(ch)[0] not in "LM":
            return set()
        return {c for c in classes if any(lo <= ord(ch) <= hi for lo, hi in SCRIPT_RANGES[c])}

    out = np.zeros((len(classes), *contexts.shape), bool)
    bad = np.zeros(contexts.shape, bool)
    for r, row in enumerate(contexts):
        stream = b"".join(tb[t] for t in row)
        owner = np.repeat(np.arange(len(row)), [len(tb[t]) for t in row])
        i = 0
        while i < len(stream):
            lead = stream[i]
            n = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else \
                4 if lead >> 3 == 30 else 0
            try:
                ch = stream[i:i + n].decode("utf-8") if n else ""
            except UnicodeDecodeError:
                ch = ""
            if len(ch) != 1:  # not a whole character: this byte is bad, move on
                bad[r, owner[i]] = True
                i += 1
                continue
            for c, name in enumerate(classes):
                if name in cls_of(ch):
                    out[c, r, owner[i:i + n]] = True
            i += n
    return out, bad


@pytest.fixture(scope="module")
def world(tiny_world):
    from saejax.eval.trained import load_sae
    from saejax.lm import load_lm
    from saejax.text.tokenizer import load_tokenizer
    from saejax.text.tokens import TokenDataset

    tok = load_tokenizer(tiny_world.lm)
    return dict(w=tiny_world, tok=tok, sae=load_sae(tiny_world.sae_small),
                lm=load_lm(tiny_world.lm), tokens=TokenDataset(tiny_world.tokens),
                labeler=ScriptLabeler.from_tokenizer(tok, ("arabic", "cyrillic")))


def test_token_bytes_of_a_real_tokenizer(world):
    tok, tokens = world["tok"], world["tokens"]
    tb = token_bytes(tok)
    assert tb[tokens.bos_id] == b""
    assert any(b is not None and len(b) == 1 and b[0] >= 0x80 for b in tb)  # byte tokens exist
    for row in tokens.take(range(0, 40)):
        body = [int(t) for t in row if t != tokens.bos_id]
        text = b"".join(tb[t] for t in body).decode("utf-8", errors="replace")
        assert text == tok.decode(body)


def test_labels_match_pythons_decoder(world):
    ctx = world["tokens"].take(range(len(world["tokens"])))
    lab = world["labeler"].label(ctx)
    want, bad = reference_labels(world["tok"], ctx, ("arabic", "cyrillic"))
    np.testing.assert_array_equal(lab.matrix(), want)
    np.testing.assert_array_equal(lab.unresolved, bad)
    # The tiny BPE splits most Arabic and Cyrillic letters into byte tokens: context matters.
    frag_in = lab.fragment & lab.has("arabic")
    assert frag_in.sum() > 0.2 * lab.has("arabic").sum()


CONTEXTS = range(0, 128)  # every pass below uses these, 32 at a time (one compiled shape)


@pytest.fixture(scope="module")
def site_acts(world):
    """Activations, mask and tokens of CONTEXTS, all held at once (for brute force)."""
    lm, tokens, sae = world["lm"], world["tokens"], world["sae"]
    bs = list(site_batches(lm, tokens, [sae.site], CONTEXTS, batch_contexts=32))
    return (np.concatenate([np.asarray(b.acts[sae.site]) for b in bs]),
            np.concatenate([b.mask for b in bs]), np.concatenate([b.tokens for b in bs]))


def brute_force(world, site_acts, units, thresholds_of):
    """numpy: per-unit counts over all tokens, from every activation held at once."""
    sae, lab = world["sae"], world["labeler"]
    x, m, t = site_acts
    cls, bad = reference_labels(world["tok"], t, lab.classes)
    f = np.asarray(sae.encode(sae.params, x)) if units == "feature" else x
    f, cls, bad = f[m], cls[:, m], bad[m]  # [N, U], [C, N]
    th = thresholds_of(f)  # [L, U]
    n_fires = np.array([(f > t).sum(0) for t in th])
    n_in = np.array([[((f > t) & c[:, None]).sum(0) for t in th] for c in cls])
    # Activations this close to a threshold may fall either side of it in a differently fused
    # (jitted) encoder: the counts may differ by at most that many.
    # (ReLU zeros are exact in both, so only firing values count as near.)
    near = np.array([((np.abs(f - t) <= 1e-6 * (1 + np.abs(t))) & (f > 0)).sum(0) for t in th])
    pos = np.where(f > 0, f, 0)
    return dict(n_tokens=int(m.sum()), n_class=cls.sum(1), n_unresolved=int(bad.sum()),
                n_fires=n_fires, n_in=n_in, near=near, mass=pos.sum(0),
                mass_in=np.array([pos[c].sum(0) for c in cls]), max_act=pos.max(0), th=th,
                f=f, cls=cls)


def check(stats, kind, ref):
    u = stats.units[kind]
    assert stats.n_tokens == ref["n_tokens"]
    np.testing.assert_array_equal(stats.n_class, ref["n_class"])
    assert stats.n_unresolved == ref["n_unresolved"]
    np.testing.assert_allclose(u.thresholds, ref["th"], rtol=1e-6)
    assert (np.abs(u.n_fires - ref["n_fires"]) <= ref["near"]).all()
    assert (np.abs(u.n_in - ref["n_in"]) <= ref["near"][None]).all()
    assert ref["near"].sum() <= 0.001 * ref["n_fires"][0].sum()  # exact almost everywhere
    np.testing.assert_allclose(u.mass, ref["mass"], rtol=1e-4)
    np.testing.assert_allclose(u.mass_in, ref["mass_in"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(u.max_act, ref["max_act"], rtol=1e-6)
    # The derived rates, from first principles.
    f, in_ar = ref["f"], ref["cls"][0]
    fires = f > 0
    with np.errstate(invalid="ignore"):
        prec = (fires & in_ar[:, None]).sum(0) / fires.sum(0)
    rec = (fires & in_ar[:, None]).sum(0) / in_ar.sum()
    np.testing.assert_allclose(stats.precision(kind, "arabic")[0], prec, atol=0.01)
    np.testing.assert_allclose(stats.recall(kind, "arabic"), rec, atol=0.01)
    p, r = np.nan_to_num(prec), rec
    np.testing.assert_allclose(stats.f1(kind, "arabic"),
                               np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0),
                               atol=0.01)
    # ... and exactly from the counters.
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(stats.precision(kind, "arabic"), u.n_in[0] / u.n_fires)


def test_counts_match_brute_force_features_and_neurons(world, site_acts):
    levels = (0.0, 0.03, 0.1)
    # A tiny chunk forces many chunks per batch and a padded last one.
    opts = ScriptOptions(classes=("arabic", "cyrillic"), levels=levels, batch_contexts=32,
                         chunk_elements=64 * 37)
    stats = script_stats(world["lm"], world["tokens"], CONTEXTS, world["labeler"],
                         sae=world["sae"], opts=opts)
    absolute = lambda f: np.repeat(np.array(levels)[:, None], f.shape[1], 1)  # noqa: E731
    for kind in ("feature", "neuron"):
        ref = brute_force(world, site_acts, kind, absolute)
        check(stats, kind, ref)
        assert ref["n_fires"][1].sum() > ref["n_fires"][2].sum() > 0  # the levels bite
    assert stats.n_class[0] > 0 and stats.n_class[1] > 0
    assert 0 < stats.n_fragment_in[0] <= stats.n_fragment

    # Rankings: eligible units ordered by precision (ties by support), or by F1.
    p, n = np.nan_to_num(stats.precision("feature", "arabic")[0], nan=-1), \
        stats.units["feature"].n_fires[0]
    ok = [i for i in range(len(p)) if n[i] >= 40]
    want = sorted(ok, key=lambda i: (-p[i], -n[i]))[:5]
    got = stats.rank("feature", "arabic", "precision", min_support=40, top_k=5)
    assert [r["id"] for r in got] == want
    assert all(r["n_fires"] >= 40 for r in got)
    f1, n = stats.f1("neuron", "cyrillic"), stats.units["neuron"].n_fires[0]
    assert [r["id"] for r in stats.rank("neuron", "cyrillic", "f1", top_k=3)] == \
        sorted(range(len(f1)), key=lambda i: (-f1[i], -n[i]))[:3]

    d = stats.to_dict(top_k=3, min_support=5)
    json.dumps(d, allow_nan=False)
    assert d["classes"]["arabic"]["share"] == pytest.approx(stats.n_class[0] / stats.n_tokens)
    row = d["classes"]["arabic"]["feature"]["precision"][0]
    assert [lv["level"] for lv in row["levels"]] == list(levels)
    text = format_report(stats, top_k=3, min_support=5)
    assert "arabic:" in text and "neurons by f1" in text and "features by precision" in text


def test_report_says_when_a_script_never_occurs():
    """No token of a class: one plain sentence instead of ranking tables of zeros."""
    from saejax.analysis.scripts import ScriptStats

    stats = ScriptStats(("hebrew",), (0.0,), False, n_contexts=40, n_tokens=600,
                        n_class=np.zeros(1, np.int64), n_fragment=0,
                        n_fragment_in=np.zeros(1, np.int64), n_unresolved=0)
    text = format_report(stats)
    assert "hebrew: no hebrew token occurs in the 40 contexts analysed" in text
    assert "by precision" not in text and "(none)" not in text


def test_relative_levels_match_brute_force(world, site_acts):
    fr = (0.0, 0.25, 0.5)
    opts = ScriptOptions(classes=("arabic", "cyrillic"), levels=fr, relative_levels=True,
                         neurons=False)
    stats = script_stats(world["lm"], world["tokens"], CONTEXTS, world["labeler"],
                         sae=world["sae"], opts=opts)
    assert set(stats.units) == {"feature"}
    ref = brute_force(world, site_acts, "feature",
                      lambda f: np.array(fr)[:, None] * np.maximum(f.max(0), 0)[None])
    check(stats, "feature", ref)


def precision_curve(acts: np.ndarray, in_class: np.ndarray,
                    thresholds=None) -> dict[str, list]:
    """Precision among firings with activation > t, for each t (default: 0 and 20 steps up to
    the max). acts [n], in_class [n] bool. Returns {"threshold", "n_fires", "precision"}."""
    acts, in_class = np.asarray(acts, np.float64), np.asarray(in_class, bool)
    if thresholds is None:
        top = float(acts.max()) if acts.size else 0.0
        thresholds = np.linspace(0.0, top, 21)[:-1]
    # Sorted once; count above t by binary search (exact, any number of thresholds).
    order = np.argsort(acts, kind="stable")
    a, cum_in = acts[order], np.concatenate([[0], np.cumsum(in_class[order])])
    n_fires, n_in = [], []
    for t in thresholds:
        i = int(np.searchsorted(a, t, side="right"))
        n_fires.append(len(a) - i)
        n_in.append(int(cum_in[-1] - cum_in[i]))
    return {"threshold": [float(t) for t in thresholds], "n_fires": n_fires,
            "precision": [k / n if n else None for k, n in zip(n_in, n_fires)]}


def test_one_unit_curve_and_plot(world, site_acts, tmp_path):
    acts = unit_activations(world["lm"], world["tokens"], CONTEXTS, world["labeler"], [3, 7],
                            sae=world["sae"], batch_contexts=32)
    ref = brute_force(world, site_acts, "feature", lambda f: np.zeros((1, f.shape[1])))
    for u in (3, 7):
        a, c = acts[u]
        fires = ref["f"][:, u] > 0
        assert ref["near"][0, u] == 0  # (else the firing sets could differ)
        np.testing.assert_allclose(np.sort(a), np.sort(ref["f"][fires, u]), rtol=1e-4)
        assert c.shape == (2, len(a)) and c[0].sum() == (fires & ref["cls"][0]).sum()
    a, c = acts[3]
    curve = precision_curve(a, c[0], [0.0, float(np.median(a))])
    above = a > np.median(a)
    assert curve["n_fires"] == [len(a), int(above.sum())]
    assert curve["precision"][1] == pytest.approx(c[0][above].mean())
    assert precision_curve(a, c[0], [1e9])["precision"] == [None]
    assert len(precision_curve(a, c[0])["threshold"]) == 20
    png = tmp_path / "h.png"
    plot_class_histogram(a, c[0], png, class_name="arabic", title="feature 3")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyse_scripts_from_an_export(world, tmp_path):
    stats = analyse_scripts(world["w"].sae_export, world["w"].tokens, tmp_path, contexts="0:64",
                            opts=ScriptOptions(levels=(0.0, 0.05), min_support=3, top_k=4))
    d = json.loads((tmp_path / "scripts.json").read_text())
    assert d["n_contexts"] == 64 and d["classes"]["arabic"]["n_tokens"] == stats.n_class[0]
    assert "arabic:" in (tmp_path / "scripts.txt").read_text()
    best = d["classes"]["arabic"]["feature"]["f1"][0]["id"]
    assert (tmp_path / f"scripts_arabic_{best}.png").is_file()
