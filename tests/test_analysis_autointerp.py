"""Automated interpretability: Spearman with ties, the example split, the offline baseline on
synthetic features, and the OpenAI-compatible client against a real local HTTP server."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from saejax.analysis.autointerp import (ChatClient, LLMConfig, LLMError, LLMInterpreter,
                                        MalformedReply, TokenListInterpreter,
                                        annotate_feature_files, explainer_messages,
                                        parse_simulation, quantize, score_features, spearman,
                                        split_examples)

# -- statistics ---------------------------------------------------------------------------------


def test_spearman_by_hand():
    # x ranks 1, 2.5, 2.5, 4; y ranks 1, 3, 2, 4; centred: (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5)
    # rho = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [10, 200, 3000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Two ties on each side: x ranks 1.5 1.5 3 4, y ranks 1 2.5 2.5 4.
    a, b = np.array([-1.0, -1.0, 0.5, 1.5]), np.array([-1.5, 0.0, 0.0, 1.5])
    assert spearman([0, 0, 1, 2], [0, 1, 1, 5]) == pytest.approx(a @ b / np.sqrt(a @ a * (b @ b)))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_spearman_matches_the_no_ties_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))  # ranks (no ties)
    assert spearman(x, y) == pytest.approx(1 - 6 * (d @ d) / (50 * (50**2 - 1)))


def test_quantize():
    assert quantize([0, 0.04, 0.05, 0.5, 1.0, 2.0, -1], 1.0) == [0, 0, 1, 5, 10, 10, 0]
    assert quantize([1, 2], 0.0) == [0, 0]


# -- synthetic features -------------------------------------------------------------------------

WORDS = [f" w{i}" for i in range(40)] + [" cat", " dog", " fish", " the"]


def corpus(seed=0, n=400, T=24):
    rng = np.random.default_rng(seed)
    return np.array(WORDS, dtype=object)[rng.integers(0, len(WORDS), (n, T))]


def make_examples(toks, acts, n_top=40, n_samples=40, before=6, after=2, seed=0):
    """{"top", "samples"} like saejax.analysis.features: windows around the strongest firing
    positions and around uniformly drawn firing positions."""
    rng = np.random.default_rng(seed)
    T = toks.shape[1]

    def ex(c, p):
        lo, hi = max(0, p - before), min(T, p + after + 1)
        return {"context": int(c), "pos": int(p), "act": float(acts[c, p]),
                "tokens": list(toks[c, lo:hi]), "acts": [float(a) for a in acts[c, lo:hi]],
                "focus": int(p - lo)}

    flat = np.argsort(-acts, axis=None, kind="stable")[:n_top]
    top = [ex(*np.unravel_index(i, acts.shape)) for i in flat]
    firing = np.argwhere(acts > 0)
    pick = rng.choice(len(firing), min(n_samples, len(firing)), replace=False)
    return {"top": top, "samples": [ex(*firing[i]) for i in pick]}


def token_feature(toks, seed=1):
    """Fires on " cat" (1.0), " dog" (0.6) and " fish" (0.3), with 10% noise."""
    rng = np.random.default_rng(seed)
    w = {" cat": 1.0, " dog": 0.6, " fish": 0.3}
    base = np.vectorize(lambda t: w.get(t, 0.0))(toks)
    return base * (1 + 0.1 * rng.random(toks.shape))


def test_split_never_overlaps():
    toks = corpus()
    d = make_examples(toks, token_feature(toks), n_top=60, n_samples=60)
    # Samples that duplicate top examples, to be sure the split sees them.
    samples = d["samples"] + d["top"][:20]
    explain, held = split_examples(d["top"], samples, 10, 25, 25, np.random.default_rng(0))
    assert len(explain) == 10 and len(held) == 50
    assert [e["act"] for e in explain] == sorted((e["act"] for e in explain), reverse=True)
    spans = [(e["context"], e["pos"] - e["focus"], e["pos"] - e["focus"] + len(e["tokens"]))
             for e in explain + held]
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            assert not (a[0] == b[0] and a[1] < b[2] and b[1] < a[2]), (a, b)
    with pytest.raises(ValueError, match="focus"):
        split_examples([{"context": 0, "pos": 0, "tokens": [], "acts": []}], [], 1, 1, 1,
                       np.random.default_rng(0))


def test_baseline_scores_token_identity_high_and_shuffled_near_zero():
    toks = corpus()
    acts = token_feature(toks)
    rng = np.random.default_rng(5)
    shuffled = rng.permutation(acts.reshape(-1)).reshape(acts.shape)
    # A feature of context: fires on the token after " the" (the token itself varies).
    after_the = np.zeros(acts.shape)
    after_the[:, 1:] = (toks[:, :-1] == " the") * (1 + rng.random((toks.shape[0], 23)))
    feats = {"cat": make_examples(toks, acts), "shuffled": make_examples(toks, shuffled),
             "after": make_examples(toks, after_the)}
    res = {r["id"]: r for r in score_features(feats, TokenListInterpreter(), 10, 30, 30, seed=0)}
    cat = res["cat"]
    assert cat["explanation"].startswith('fires on: " cat" (')
    assert '" dog"' in cat["explanation"] and cat["n_failed"] == 0
    assert cat["score"] > 0.8
    assert res["after"]["score"] > 0.6 and 'after: " the"' in res["after"]["explanation"]
    assert abs(res["shuffled"]["score"]) < 0.15
    assert 60 * 3 <= cat["n_tokens"] <= 60 * 9  # windows of 3..9 tokens
    assert cat["n_heldout"] == 60
    # The split depends on (seed, id) only: the same again.
    again = score_features({"cat": feats["cat"]}, TokenListInterpreter(), 10, 30, 30, seed=0)
    assert again[0]["score"] == cat["score"]


def test_baseline_explanation_roundtrips_odd_tokens():
    ex = {"context": 0, "pos": 1, "act": 2.0, "focus": 1,
          "tokens": ['"q\\', "\n", " ب"], "acts": [0.0, 2.0, 1.0]}
    interp = TokenListInterpreter()
    text = interp.explain([ex])
    on, after = interp.parse(text)
    assert on["\n"] > on[" ب"] > 0 and after['"q\\'] > 0
    assert interp.simulate(text, ex)[1] == max(on["\n"], after['"q\\'])


def test_too_few_examples_is_an_error_not_a_crash():
    r = score_features({3: {"top": [], "samples": []}}, TokenListInterpreter())
    assert r[0]["score"] is None and "too few" in r[0]["error"]
    with pytest.raises(ValueError, match="feature 4"):
        score_features({4: {"samples": []}}, TokenListInterpreter())


# -- the OpenAI-compatible client against a real HTTP server ------------------------------------


class FakeLLM:
    """/v1/chat/completions on 127.0.0.1: records requests, answers from a script of
    (status, content) or, when the script is empty, with a rule: explanations say "cat"; the
    simulator predicts 10 on " cat" and 0 elsewhere."""

    def __init__(self):
        self.requests, self.script = [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers),
                                      "body": body})
                status, content = fake.script.pop(0) if fake.script else (200, fake.rule(body))
                if status == 200 and not isinstance(content, bytes):
                    content = json.dumps({"choices": [{"index": 0, "message": {
                        "role": "assistant", "content": content}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(content if isinstance(content, bytes) else content.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def rule(body):
        user = body["messages"][-1]["content"]
        if "Tokens (" not in user:
            return "Explanation: the word cat.\nIt fires on cats."
        tokens = json.loads(user.split("): ", 1)[1])
        return "```json\n" + json.dumps([10 if t == " cat" else 0 for t in tokens]) + "\n```"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    f = FakeLLM()
    yield f
    f.close()


def client(fake, **kw):
    return ChatClient(LLMConfig(base_url=fake.url, model="tiny-model", backoff_s=0.0, **kw))


def test_request_shape_and_key_from_env(fake, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    c = client(fake, api_key_env="MY_KEY", temperature=0.5)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    fake.script = [(200, "hello")]
    assert c.complete(msgs) == "hello"
    r = fake.requests[0]
    assert r["path"] == "/v1/chat/completions"
    assert r["headers"]["Authorization"] == "Bearer sk-test"
    assert r["headers"]["Content-Type"] == "application/json"
    assert r["body"]["model"] == "tiny-model" and r["body"]["messages"] == msgs
    assert r["body"]["temperature"] == 0.5
    # An explicit key wins; no key at all sends no Authorization header.
    fake.script = [(200, "a"), (200, "b")]
    client(fake, api_key="sk-explicit", api_key_env="MY_KEY").complete(msgs)
    monkeypatch.delenv("MY_KEY")
    client(fake, api_key_env="MY_KEY").complete(msgs)
    assert fake.requests[1]["headers"]["Authorization"] == "Bearer sk-explicit"
    assert "Authorization" not in fake.requests[2]["headers"]


def test_retries_on_server_errors_not_on_client_errors(fake):
    fake.script = [(500, b"boom"), (429, b"slow down"), (200, b"{not json"), (200, "ok")]
    assert client(fake, max_retries=3).complete([{"role": "user", "content": "x"}]) == "ok"
    assert len(fake.requests) == 4
    fake.script = [(503, b"down")] * 3
    with pytest.raises(LLMError, match="after 3 attempts.*HTTP 503"):
        client(fake, max_retries=2).complete([{"role": "user", "content": "x"}])
    n = len(fake.requests)
    fake.script = [(401, b'{"error": "bad key"}')]
    with pytest.raises(LLMError, match="HTTP 401.*bad key"):
        client(fake, max_retries=3).complete([{"role": "user", "content": "x"}])
    assert len(fake.requests) == n + 1  # no retry


def test_unreachable_server_fails_after_retries():
    c = ChatClient(LLMConfig(base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_s=0.0,
                             timeout_s=2.0))
    with pytest.raises(LLMError, match="after 2 attempts"):
        c.complete([{"role": "user", "content": "x"}])


def test_parse_simulation():
    assert parse_simulation("[0, 3, 10]", 3) == [0.0, 3.0, 10.0]
    assert parse_simulation("Sure! Here you go:\n```json\n[1, 2.5, 12, -1]\n```", 4) == \
        [1.0, 2.5, 10.0, 0.0]
    assert parse_simulation('Tokens ["a", "b"] -> [4, 5]', 2) == [4.0, 5.0]
    with pytest.raises(MalformedReply, match="a list of 2 numbers"):
        parse_simulation("[1, 2]", 3)
    with pytest.raises(MalformedReply, match="no JSON list"):
        parse_simulation("the activations are 1 2 3", 3)
    with pytest.raises(MalformedReply, match="non-numbers"):
        parse_simulation('["1", "2", "3"]', 3)


def test_llm_interpreter_malformed_reply_then_retry_then_failure(fake):
    interp = LLMInterpreter(client(fake, parse_retries=1))
    ex = {"context": 0, "pos": 1, "act": 1.0, "focus": 1, "tokens": [" a", " cat", " b"],
          "acts": [0.0, 1.0, 0.0]}
    fake.script = [(200, "I think 0, 10, 0"), (200, "[0, 9, 0]")]
    assert interp.simulate("cats", ex) == [0.0, 9.0, 0.0]
    fake.script = [(200, "[0, 9]"), (200, "nope")]
    with pytest.raises(MalformedReply, match="2 malformed replies.*no JSON list"):
        interp.simulate("cats", ex)
    sim = fake.requests[-1]["body"]["messages"]
    assert sim[0]["role"] == "system" and "JSON list of integers" in sim[0]["content"]
    assert sim[1]["content"] == 'Explanation: cats\n\nTokens (3): [" a", " cat", " b"]'


def test_explainer_prompt_format():
    ex = {"context": 0, "pos": 1, "act": 4.0, "focus": 1, "tokens": [" a", "\n", " cat"],
          "acts": [0.0, 2.0, 4.0]}
    msgs = explainer_messages([ex])
    assert msgs[0]["role"] == "system"
    assert "Excerpt 1:\n<start>\n a\t0\n\\n\t5\n cat\t10\n<end>" in msgs[1]["content"]


def test_score_features_through_the_llm(fake, tmp_path):
    toks = corpus(seed=3)
    feats = {7: make_examples(toks, token_feature(toks), n_top=20, n_samples=20)}
    fake.script = [(200, "")]  # one empty explanation: retried
    res = score_features(feats, LLMInterpreter(client(fake)), 5, 5, 5, seed=1)[0]
    assert res["explanation"] == "the word cat." and res["n_failed"] == 0
    assert res["n_heldout"] == 10 and res["score"] > 0.5
    assert len(fake.requests) == 2 + 10
    explain_prompt = fake.requests[1]["body"]["messages"][1]["content"]
    assert explain_prompt.count("<start>") == 5

    # The analysis-directory files get their fields filled in.
    d = tmp_path / "features"
    d.mkdir()
    (d / "7.json").write_text(json.dumps({"id": 7, **feats[7], "explanation": None,
                                          "score": None}))
    annotate_feature_files(d, TokenListInterpreter(), n_top_explain=5, n_heldout_top=5,
                           n_heldout_random=5)
    doc = json.loads((d / "7.json").read_text())
    assert doc["explanation"].startswith('fires on: " cat"') and doc["score"] > 0.5
    assert doc["autointerp"]["n_heldout"] == 10 and doc["top"] == feats[7]["top"]
