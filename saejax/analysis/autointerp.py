"""Automated interpretability (Bricken et al. 2023, after Bills et al. 2023): explain a feature
from its top-activating examples, simulate its activations on held-out examples from the
explanation alone, and score the explanation by the Spearman correlation between simulated and
true activations over every token of the held-out examples.

Examples are plain dicts, the shape of the per-feature files of `saejax.analysis.features`:

    {"context": int, "pos": int, "act": float,          # where the example is, its activation
     "tokens": [str, ...], "acts": [float, ...],        # a window of decoded tokens around it
     "focus": int}                                      # index of (context, pos) in the window

A feature's `"top"` examples feed the explainer and the held-out top set (a seeded random split
of them); its `"samples"` (examples drawn across the activation range) give the held-out random
set. No held-out window shares a token with an explanation window, nor with another held-out one.

Interpreters. `LLMInterpreter` talks to any OpenAI-compatible chat-completions endpoint through
`ChatClient` (standard library only; URL, key, model, timeout and retries from `LLMConfig`).
`TokenListInterpreter` is the offline baseline: its explanation lists the tokens (and preceding
tokens) that carry the most activation per occurrence in the top examples, and its simulator
predicts from that list alone. It scores high on token-identity features and ~0 on features
with no token regularity, so the pipeline runs, and is tested, without a network.

    client = LLMInterpreter(ChatClient(LLMConfig(base_url="http://127.0.0.1:8000/v1", model="m")))
    results = score_features({7: {"top": [...], "samples": [...]}}, client)
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.stats

Example = dict[str, Any]
MAX_LEVEL = 10
"""Activations are shown to, and predicted by, the LLM as integers 0..MAX_LEVEL."""


# -- statistics ---------------------------------------------------------------------------------


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (`scipy.stats.spearmanr`: Pearson correlation of the ranks,
    ties getting the average of the ranks they span). NaN when either input is constant or has
    fewer than 2 values."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of one length, got {a.shape}, {b.shape}")
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan  # undefined (scipy would say so with a warning)
    return float(scipy.stats.spearmanr(a, b).statistic)


def quantize(acts: Sequence[float], max_act: float) -> list[int]:
    """Activations as integers 0..MAX_LEVEL relative to max_act (round half up; <= 0 -> 0)."""
    if max_act <= 0:
        return [0] * len(acts)
    a = np.clip(np.asarray(acts, np.float64) / max_act, 0.0, 1.0)
    return [int(v) for v in np.floor(a * MAX_LEVEL + 0.5)]


# -- example selection --------------------------------------------------------------------------


def _window(ex: Example) -> tuple[int, int, int]:
    """(context, first, stop) positions the example's tokens cover."""
    for key in ("context", "pos", "tokens", "acts", "focus"):
        if key not in ex:
            raise ValueError(f"example lacks the field {key!r}: {str(ex)[:120]}")
    if len(ex["tokens"]) != len(ex["acts"]):
        raise ValueError(f"example at context {ex['context']} pos {ex['pos']}: "
                         f"{len(ex['tokens'])} tokens but {len(ex['acts'])} acts")
    first = int(ex["pos"]) - int(ex["focus"])
    return int(ex["context"]), first, first + len(ex["tokens"])


def _overlaps(w: tuple[int, int, int], taken: Sequence[tuple[int, int, int]]) -> bool:
    return any(w[0] == t[0] and w[1] < t[2] and t[1] < w[2] for t in taken)


def split_examples(top: Sequence[Example], samples: Sequence[Example], n_top_explain: int,
                   n_heldout_top: int, n_heldout_random: int,
                   rng: np.random.Generator) -> tuple[list[Example], list[Example]]:
    """(explanation examples, held-out examples), every window disjoint from every other.

    In a seeded random order, top examples are taken for the explanation (n_top_explain), then
    top examples and samples are held out (n_heldout_top, n_heldout_random), each skipped when
    its window shares a token with one already chosen (duplicates and near-duplicates would
    leak the explanation's examples into the score, or count tokens twice)."""
    top, taken = list(top), []
    chosen: list[list[Example]] = []
    for pool, n in ((top, n_top_explain), (top, n_heldout_top), (list(samples), n_heldout_random)):
        got: list[Example] = []
        for i in rng.permutation(len(pool)):
            if len(got) == n:
                break
            w = _window(pool[i])
            if not _overlaps(w, taken):
                taken.append(w)
                got.append(pool[i])
        chosen.append(got)
    explain, heldout = chosen[0], chosen[1] + chosen[2]
    return sorted(explain, key=lambda e: -float(e["act"])), heldout


# -- interpreters -------------------------------------------------------------------------------


class MalformedReply(Exception):
    """A reply that could not be used (after retries: a simulation that is not one number per
    token, an empty explanation); the message says what was wrong."""


class Interpreter(Protocol):
    """Writes explanations and simulates activations from them."""

    def explain(self, examples: Sequence[Example]) -> str:
        """One explanation from the examples (tokens with true activations)."""

    def simulate(self, explanation: str, example: Example) -> list[float]:
        """Predicted activations 0..MAX_LEVEL, one per token of example["tokens"] (the true
        activations must not be looked at); raises MalformedReply when it cannot."""


class TokenListInterpreter:
    """The offline baseline: explanations list tokens by activation per occurrence.

    explain: activations are taken relative to the examples' max. The "on" weight of a token
    string is its summed activation over (occurrences + 1) across all tokens of the explanation
    windows, the +1 a zero pseudo-occurrence that discounts tokens seen once. The "after"
    weight of a token is the same for the activation of the token *following* it, on what the
    kept "on" terms leave unexplained (so the tokens that happen to precede a token-identity
    feature's token are not credited). Up to n_terms of each with level >= 1 are written as
    `fires on: "x" (10), "y" (6); after: "z" (4)` (tokens JSON-quoted, levels 0..10).
    simulate: a token's prediction is the larger of its own level and its predecessor's
    "after" level, 0 for tokens the explanation does not name."""

    def __init__(self, n_terms: int = 6):
        self.n_terms = n_terms

    def explain(self, examples: Sequence[Example]) -> str:
        max_act = max((max(e["acts"], default=0.0) for e in examples), default=0.0)
        rel = [[max(float(a), 0.0) / max_act if max_act > 0 else 0.0 for a in e["acts"]]
               for e in examples]
        on = self._weights((t, r) for e, rs in zip(examples, rel)
                           for t, r in zip(e["tokens"], rs))
        left = [[max(r - on.get(t, 0) / MAX_LEVEL, 0.0) for t, r in zip(e["tokens"], rs)]
                for e, rs in zip(examples, rel)]
        after = self._weights((t, r) for e, rs in zip(examples, left)
                              for t, r in zip(e["tokens"], rs[1:]))
        show = lambda d: ", ".join(f"{json.dumps(t, ensure_ascii=False)} ({v})"  # noqa: E731
                                   for t, v in d.items()) or "(nothing)"
        return f"fires on: {show(on)}; after: {show(after)}"

    def _weights(self, pairs) -> dict[str, int]:
        """{token: level} of the n_terms heaviest tokens (level >= 1) of (token, activation)
        pairs, weight = summed activation / (occurrences + 1)."""
        total, count = defaultdict(float), defaultdict(int)
        for t, r in pairs:
            total[t] += r
            count[t] += 1
        w = sorted(((total[t] / (count[t] + 1), t) for t in total), key=lambda x: (-x[0], x[1]))
        levels = {t: quantize([v], 1.0)[0] for v, t in w[:self.n_terms]}
        return {t: v for t, v in levels.items() if v >= 1}

    _TERM = re.compile(r'("(?:[^"\\]|\\.)*") \((\d+)\)')

    @classmethod
    def parse(cls, explanation: str) -> tuple[dict[str, int], dict[str, int]]:
        """({token: level} it fires on, {token: level} of the token after) of an explanation."""
        on_part, _, after_part = explanation.partition("; after:")
        read = lambda s: {json.loads(q): int(v) for q, v in cls._TERM.findall(s)}  # noqa: E731
        return read(on_part), read(after_part)

    def simulate(self, explanation: str, example: Example) -> list[float]:
        on, after = self.parse(explanation)
        toks = example["tokens"]
        return [float(max(on.get(t, 0), after.get(toks[i - 1], 0) if i else 0))
                for i, t in enumerate(toks)]


# -- OpenAI-compatible chat client --------------------------------------------------------------


@dataclass(frozen=True)
class LLMConfig:
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama...)."""

    base_url: str = "https://api.openai.com/v1"
    """API root; requests go to {base_url}/chat/completions."""
    model: str = "gpt-4o-mini"
    """Model name sent with every request."""
    api_key: str = ""
    """API key; "" = read it from the environment variable api_key_env (no key: no
    Authorization header, as local servers expect)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key when api_key is empty."""
    timeout_s: float = 60.0
    """Seconds to wait for one response."""
    max_retries: int = 3
    """Retries of a request after a network error, a timeout, HTTP 408/409/429/5xx or a reply
    that is not a chat completion; other HTTP errors (bad key, unknown model) fail at once."""
    backoff_s: float = 1.0
    """Wait before retry r (0-based): backoff_s * 2**r seconds (or the server's Retry-After)."""
    parse_retries: int = 2
    """Requests again when the model's reply cannot be parsed (malformed simulation, empty
    explanation), before counting the example as failed."""
    temperature: float = 0.0
    """Sampling temperature (0: as deterministic as the server allows)."""
    max_tokens: int = 1024
    """Cap on the reply's length."""

    def __post_init__(self):
        for name in ("timeout_s", "max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LLMConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_retries", "parse_retries", "backoff_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"LLMConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"LLMConfig.base_url must be an http(s) URL, got {self.base_url!r}")


class LLMError(RuntimeError):
    """The endpoint could not be used (HTTP error, unreachable after retries)."""


RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ChatClient:
    """POST {base_url}/chat/completions with urllib; returns the first choice's text."""

    def __init__(self, cfg: LLMConfig):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.api_key = cfg.api_key or os.environ.get(cfg.api_key_env, "")

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The assistant's reply to `messages` ([{"role", "content"}, ...])."""
        body = json.dumps({"model": self.cfg.model, "messages": messages,
                           "temperature": self.cfg.temperature,
                           "max_tokens": self.cfg.max_tokens}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, wait = "", 0.0
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(wait)
            wait = self.cfg.backoff_s * 2**attempt
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code not in RETRY_STATUS:
                    raise LLMError(f"{self.url}: HTTP {e.code} {e.reason}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
                after = (e.headers.get("Retry-After") or "").strip()
                if after.isdigit():  # the server says how long to wait (capped at a minute)
                    wait = min(float(after), 60.0)
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            try:
                return _reply_text(json.loads(raw))
            except (ValueError, KeyError, IndexError, TypeError) as e:
                last = f"not a chat completion ({e}): {raw[:200]!r}"
        raise LLMError(f"{self.url}: no usable reply after {self.cfg.max_retries + 1} attempts; "
                       f"last: {last}")


def _reply_text(obj: Any) -> str:
    content = obj["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}, not text")
    return content


# -- prompts and the LLM interpreter ------------------------------------------------------------

EXPLAIN_SYSTEM = (
    "We are studying features of a neural network that reads text. Each feature looks for some "
    "particular thing in a short text excerpt. Look at the excerpts below, where the feature is "
    "active, and say in one short sentence what it looks for. Each excerpt is shown one token "
    "per line as <token><TAB><activation>; activations are integers from 0 (inactive) to 10 "
    "(the feature's strongest activation). Tokens are shown as they appear in the text, with "
    "newlines and tabs written \\n and \\t. Reply with the explanation only, no preamble.")

SIMULATE_SYSTEM = (
    "We are studying features of a neural network that reads text. Each feature looks for some "
    "particular thing in text. Given an explanation of what a feature looks for, predict its "
    "activation on every token of a text excerpt: an integer from 0 (inactive) to 10 (maximally "
    "active); most tokens are usually 0. The excerpt's tokens are given as a JSON list of "
    "strings. Reply with only a JSON list of integers, one per token in the same order, with "
    "exactly as many entries as there are tokens.")


def _show(token: str) -> str:
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def explainer_messages(examples: Sequence[Example]) -> list[dict[str, str]]:
    """Chat messages asking for an explanation; activations quantized 0..10 relative to the max
    activation over the examples (as in Bills et al.)."""
    max_act = max((max(e["acts"], default=0.0) for e in examples), default=0.0)
    blocks = []
    for i, e in enumerate(examples, 1):
        lines = [f"{_show(t)}\t{q}" for t, q in zip(e["tokens"], quantize(e["acts"], max_act))]
        blocks.append(f"Excerpt {i}:\n<start>\n" + "\n".join(lines) + "\n<end>")
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": "\n\n".join(blocks) + "\n\nExplanation:"}]


def simulator_messages(explanation: str, tokens: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking for one prediction per token of one excerpt."""
    return [{"role": "system", "content": SIMULATE_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\n"
                                        f"Tokens ({len(tokens)}): "
                                        f"{json.dumps(list(tokens), ensure_ascii=False)}"}]


def parse_simulation(reply: str, n_tokens: int) -> list[float]:
    """The first JSON list of n_tokens numbers in the reply (code fences and surrounding prose
    are skipped; values clipped to 0..10). Raises MalformedReply saying what was wrong."""
    decoder = json.JSONDecoder()
    seen = []
    for m in re.finditer(r"\[", reply):
        try:
            obj, _ = decoder.raw_decode(reply, m.start())
        except ValueError:
            continue
        if not isinstance(obj, list) or any(isinstance(v, list) for v in obj):
            continue
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) for v in obj):
            seen.append("a list with non-numbers")
            continue
        if len(obj) != n_tokens:
            seen.append(f"a list of {len(obj)} numbers")
            continue
        return [float(min(max(v, 0), MAX_LEVEL)) for v in obj]
    found = seen[0] if seen else "no JSON list"
    raise MalformedReply(f"expected a JSON list of {n_tokens} numbers, got {found}: "
                            f"{reply[:120]!r}")


class LLMInterpreter:
    """Explainer and simulator prompts sent through a ChatClient (module docstring)."""

    def __init__(self, client: ChatClient):
        self.client = client
        self.tries = client.cfg.parse_retries + 1

    def explain(self, examples: Sequence[Example]) -> str:
        for _ in range(self.tries):
            text = self.client.complete(explainer_messages(examples)).strip()
            text = re.sub(r"^(explanation\s*:\s*)", "", text, flags=re.I).strip()
            if text:
                return text.splitlines()[0].strip()
        raise MalformedReply(f"empty explanation after {self.tries} attempts")

    def simulate(self, explanation: str, example: Example) -> list[float]:
        reasons = []
        for _ in range(self.tries):
            reply = self.client.complete(simulator_messages(explanation, example["tokens"]))
            try:
                return parse_simulation(reply, len(example["tokens"]))
            except MalformedReply as e:
                reasons.append(str(e))
        raise MalformedReply(f"{self.tries} malformed replies; last: {reasons[-1]}")


# -- scoring ------------------------------------------------------------------------------------


def score_feature(top: Sequence[Example], samples: Sequence[Example], client: Interpreter, *,
                  n_top_explain: int = 10, n_heldout_top: int = 30, n_heldout_random: int = 30,
                  rng: np.random.Generator) -> dict[str, Any]:
    """{explanation, score, n_tokens, n_heldout, n_failed, failures, error} for one feature.

    score: Spearman correlation of simulated vs true activations over all tokens of the
    successfully simulated held-out examples; 0.0 when the simulation is constant (it carries
    no information); None (with `error`) when nothing could be scored."""
    explain, heldout = split_examples(top, samples, n_top_explain, n_heldout_top,
                                      n_heldout_random, rng)
    out: dict[str, Any] = {"explanation": None, "score": None, "n_tokens": 0,
                           "n_heldout": len(heldout), "n_failed": 0, "failures": [],
                           "error": None}
    if not explain or not heldout:
        out["error"] = (f"too few examples: {len(explain)} to explain, {len(heldout)} held out "
                        f"(of {len(top)} top and {len(samples)} samples)")
        return out
    try:
        out["explanation"] = client.explain(explain)
    except MalformedReply as e:
        out["error"] = f"explanation failed: {e}"
        return out
    true, sim = [], []
    for ex in heldout:
        try:
            pred = client.simulate(out["explanation"], ex)
        except MalformedReply as e:
            out["n_failed"] += 1
            out["failures"].append(str(e))
            continue
        true += [float(a) for a in ex["acts"]]
        sim += pred
    out["n_tokens"] = len(true)
    if not true:
        out["error"] = "every held-out simulation failed"
    elif len(set(true)) < 2:
        out["error"] = "the true activations are constant on the held-out examples"
    else:
        rho = spearman(sim, true)
        out["score"] = 0.0 if math.isnan(rho) else rho
    return out


def score_features(examples_by_feature: Mapping[Any, Mapping[str, Sequence[Example]]],
                   client: Interpreter, n_top_explain: int = 10, n_heldout_top: int = 30,
                   n_heldout_random: int = 30, seed: int = 0) -> list[dict[str, Any]]:
    """Explain and score every feature of {id: {"top": [...], "samples": [...]}}; returns
    [{"id", "explanation", "score", "n_tokens", ...}] in the mapping's order (see
    `score_feature`). The split of each feature depends on (seed, id) only. Defaults: 60
    held-out examples as in the paper."""
    results = []
    for fid, d in examples_by_feature.items():
        if "top" not in d:
            raise ValueError(f"feature {fid}: no 'top' examples (keys: {sorted(d)})")
        rng = np.random.default_rng([seed, zlib.crc32(str(fid).encode())])
        res = score_feature(d["top"], d.get("samples", []), client, n_top_explain=n_top_explain,
                            n_heldout_top=n_heldout_top, n_heldout_random=n_heldout_random,
                            rng=rng)
        results.append({"id": fid, **res})
    return results


def annotate_feature_files(features_dir, client: Interpreter, ids: Sequence[Any] | None = None,
                           **kwargs) -> list[dict[str, Any]]:
    """Score the features of an analysis directory's `features/{id}.json` files (all, or `ids`)
    and write each one's "explanation", "score" and "autointerp" (the rest of the result) back
    into its file. kwargs: those of score_features."""
    from saejax.atomic import write_json_atomic  # noqa: PLC0415

    d = Path(features_dir)
    files = ([d / f"{i}.json" for i in ids] if ids is not None
             else sorted(d.glob("*.json"), key=lambda p: (len(p.stem), p.stem)))
    loaded = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"no feature file {f}")
        loaded[f.stem] = json.loads(f.read_text(encoding="utf-8"))
    results = score_features(loaded, client, **kwargs)
    for f, res in zip(files, results):
        doc = loaded[f.stem]
        doc["explanation"], doc["score"] = res["explanation"], res["score"]
        doc["autointerp"] = {k: v for k, v in res.items()
                             if k not in ("id", "explanation", "score")}
        write_json_atomic(str(f), doc)
    return results


def summarize_scores(results: Sequence[Mapping[str, Any]]) -> str:
    """One line: how many features were scored, their mean and median score, how many failed."""
    scores = np.array([r["score"] for r in results if r.get("score") is not None], float)
    failed = len(results) - len(scores)
    if not len(scores):
        return f"autointerp: no feature could be scored ({failed} failed)"
    return (f"autointerp: {len(scores)} features scored, mean {scores.mean():.3f}, median "
            f"{np.median(scores):.3f} (Spearman of simulated vs true activations); "
            f"{failed} not scored")
