"""What the tokens of a vocabulary are as text: their bytes, their display strings and the
writing systems (scripts) they belong to.

Token bytes. `token_bytes` gives the UTF-8 bytes each token id stands for: clean text from
decoding the id alone is taken as is, else the bytes come from the byte-level alphabet (GPT-2
style, `byte_decoder`) or a SentencePiece byte token ("<0xD8>").

Display strings. `TokenStrings` turns ids into strings for people (the feature browser): one token
on its own, or a run of tokens decoded in context so a character split over tokens shows whole.

Script classes. A class is a named set of Unicode ranges (`SCRIPT_RANGES`). A token is in a class
when a *letter or combining mark* (Unicode categories L*, M*) of the class touches one of its
bytes; digits, punctuation and symbols never count (Arabic-Indic digits and the Arabic comma do
not make a token Arabic, a Latin digit is in no class). A mixed token (e.g. "aب", or " ال" with a
space) is in every class it touches, so class counts can overlap.

Partial UTF-8. Byte-level BPE splits rare characters into byte tokens: a lone 0xD8 decodes to
"\\ufffd" and cannot be classified by itself. Tokens are therefore classified in context
(`ScriptLabeler`): the bytes of a whole context are laid end to end, decoded as UTF-8
(`utf8_chars`), and each token gets the classes of every character any of its bytes belongs to,
so the two halves of "ب" (0xD8 0xA8) are both Arabic. What still cannot be resolved is marked
(`TokenLabels.unresolved`): a character cut by the context boundary (the context starts with
continuation bytes, or ends before the character does) or a token whose bytes are unknown;
`TokenLabels.fragment` marks the tokens that are not complete UTF-8 alone.

    labeler = ScriptLabeler.from_tokenizer(load_tokenizer(lm_dir), ("arabic", "cyrillic"))
    labels = labeler.label(token_ids)           # [B, T] ids -> TokenLabels
    labels.has("arabic")                        # [B, T] bool
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Named Unicode ranges (inclusive) of each class; only letters and marks inside them count.
SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x1E00, 0x1EFF),
              (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xAB30, 0xAB6F), (0xFF21, 0xFF3A),
              (0xFF41, 0xFF5A)),
    "greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "cyrillic": ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "armenian": ((0x0530, 0x058F), (0xFB13, 0xFB17)),
    "hebrew": ((0x0590, 0x05FF), (0xFB1D, 0xFB4F)),
    "arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x0870, 0x089F), (0x08A0, 0x08FF),
               (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "devanagari": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "thai": ((0x0E00, 0x0E7F),),
    "georgian": ((0x10A0, 0x10FF), (0x2D00, 0x2D2F)),
    # CJK: Han, Hiragana, Katakana and Hangul as one class (the question is "is this East Asian
    # text"; they share documents). Han includes the extension planes.
    "cjk": ((0x1100, 0x11FF), (0x2E80, 0x2FDF), (0x3005, 0x3007), (0x3040, 0x30FF),
            (0x3130, 0x318F), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
            (0xA960, 0xA97F), (0xAC00, 0xD7AF), (0xD7B0, 0xD7FF), (0xF900, 0xFAFF),
            (0xFF66, 0xFF9F), (0xFFA0, 0xFFDC), (0x20000, 0x323AF)),
}

_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable stand-in character -> byte value.

    Bytes that are printable Latin-1 stand for themselves; the other 68 are shifted to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tokenizer) -> list[bytes | None]:
    """[vocab] the UTF-8 bytes each token id stands for; b"" for special tokens, None if unknown.

    Clean text from decoding the id alone is taken as is; a token that decodes to "\\ufffd"
    (partial UTF-8) is read through the byte-level alphabet or as a SentencePiece byte token."""
    n = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    table = byte_decoder()
    out: list[bytes | None] = []
    for i, (text, piece) in enumerate(zip(texts, pieces)):
        if i in special:
            out.append(b"")
        elif "\ufffd" not in text:
            out.append(text.encode("utf-8"))
        elif piece and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif piece and (m := _SPM_BYTE.match(piece)):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(None)
    return out


def check_classes(classes: Sequence[str]) -> None:
    """Raise unless classes are 1..31 (one int32 bit each) names of SCRIPT_RANGES."""
    unknown = [c for c in classes if c not in SCRIPT_RANGES]
    if unknown or not classes or len(classes) > 31:
        raise ValueError(f"classes must be 1..31 names among {sorted(SCRIPT_RANGES)}; got "
                         f"{list(classes)}" + (f" ({unknown} unknown)" if unknown else ""))


def codepoint_classes(classes: Sequence[str]) -> np.ndarray:
    """[0x110000] int32 bitmask: bit c set when the code point is a letter/mark of classes[c]."""
    check_classes(classes)
    table = np.zeros(0x110000, np.int32)
    for bit, name in enumerate(classes):
        for lo, hi in SCRIPT_RANGES[name]:
            cps = np.arange(lo, hi + 1)
            ok = np.fromiter((unicodedata.category(chr(c))[0] in "LM" for c in cps), bool,
                             len(cps))
            table[cps[ok]] |= np.int32(1 << bit)
    return table


@dataclass(frozen=True)
class TokenLabels:
    """Class membership of the positions of a [B, T] token batch."""

    classes: tuple[str, ...]
    bits: np.ndarray
    """[B, T] int32: bit c set when the token is in classes[c]."""
    fragment: np.ndarray
    """[B, T] bool: the token alone is not complete UTF-8 (needs its neighbours)."""
    unresolved: np.ndarray
    """[B, T] bool: some byte of the token belongs to no complete character even in context
    (cut by the context boundary) or its bytes are unknown."""

    def has(self, name: str) -> np.ndarray:
        """[B, T] bool: tokens in class `name`."""
        return (self.bits >> self.classes.index(name)) & 1 == 1

    def matrix(self) -> np.ndarray:
        """[C, B, T] bool, one plane per class."""
        return np.stack([self.has(c) for c in self.classes])


class ScriptLabeler:
    """Classifies token ids by script, in context (module docstring)."""

    def __init__(self, vocab_bytes: Sequence[bytes | None], classes: Sequence[str]):
        """vocab_bytes: [vocab] bytes per token id (None = unknown, b"" = no text)."""
        self.classes = tuple(classes)
        self._cp_bits = codepoint_classes(self.classes)
        lens = np.array([len(b or b"") for b in vocab_bytes], np.int64)
        self._start = np.cumsum(lens) - lens
        self._len = lens
        self._bytes = np.frombuffer(b"".join(b or b"" for b in vocab_bytes), np.uint8)
        self._unknown = np.array([b is None for b in vocab_bytes], bool)
        self._fragment = np.zeros(len(lens), bool)
        alone = self.label(np.arange(len(lens))[:, None])
        self._fragment = alone.unresolved[:, 0] & ~self._unknown

    @classmethod
    def from_tokenizer(cls, tokenizer, classes: Sequence[str] = ("arabic",)) -> ScriptLabeler:
        return cls(token_bytes(tokenizer), classes)

    @property
    def vocab_size(self) -> int:
        return len(self._len)

    def label(self, tokens: np.ndarray) -> TokenLabels:
        """Labels of the token ids [B, T]; each row is one context, decoded on its own."""
        tokens = np.asarray(tokens, np.int64)
        B, T = tokens.shape
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}) (the tokenizer's "
                             f"vocabulary), got {tokens.min()}..{tokens.max()}")
        flat = tokens.reshape(-1)
        n = self._len[flat]
        first = np.cumsum(n) - n                      # each token's first byte in the stream
        tok_of_byte = np.repeat(np.arange(flat.size), n)
        b = self._bytes[np.repeat(self._start[flat] - first, n) + np.arange(n.sum())]
        char_id, cp, bad = utf8_chars(b, tok_of_byte // max(T, 1))
        bits = np.where(bad, 0, self._cp_bits[np.clip(cp, 0, 0x10FFFF)])
        has_bytes = n > 0
        tok_bits = np.zeros(flat.size, np.int32)
        tok_bad = self._unknown[flat].copy()
        if b.size:
            tok_bits[has_bytes] = np.bitwise_or.reduceat(bits[char_id], first[has_bytes])
            tok_bad[has_bytes] |= np.logical_or.reduceat(bad[char_id], first[has_bytes])
        return TokenLabels(self.classes, tok_bits.reshape(B, T),
                           self._fragment[flat].reshape(B, T), tok_bad.reshape(B, T))


def _need(lead: np.ndarray) -> np.ndarray:
    """Bytes a UTF-8 character starting with `lead` has (1-4; 0: not a lead byte)."""
    return np.select([lead < 0x80, (lead & 0xE0) == 0xC0, (lead & 0xF0) == 0xE0,
                      (lead & 0xF8) == 0xF0], [1, 2, 3, 4], 0)


def utf8_chars(b: np.ndarray, row: np.ndarray):
    """Decode a byte stream [n] (uint8; row [n] = its context) into characters, vectorised.

    Returns (char_id [n] the character each byte belongs to, cp [chars] int64 code points,
    bad [chars] bool: not a complete, valid character). As in a standard decoder, a character
    is a lead byte and the continuation bytes it announces; it is bad when fewer follow (cut by
    a new lead or the context's end). Continuation bytes with no lead (at a context start, or
    beyond what the lead announced) are bad characters of one byte each."""
    n = b.size
    cont = (b & 0xC0) == 0x80
    run = ~cont                                     # runs: a non-continuation byte + followers
    run[np.flatnonzero(np.diff(row, prepend=-1))] = True
    r_idx = np.flatnonzero(run)
    r_id = np.cumsum(run) - 1
    starts = run | (np.arange(n) - r_idx[r_id] >= _need(b[r_idx])[r_id])
    char_id = np.cumsum(starts) - 1
    s_idx = np.flatnonzero(starts)
    got = np.diff(np.append(s_idx, n))
    need = _need(b[s_idx])
    # Payload bits: 7/5/4/3 from the lead byte, 6 from each continuation byte.
    lead_mask = np.where(need == 1, 0x7F, 0xFF >> (need + 1))
    pos = np.arange(n) - s_idx[char_id]
    payload = np.where(pos == 0, b & lead_mask[char_id], b & 0x3F).astype(np.int64)
    shift = 6 * (got[char_id] - 1 - pos)
    cp = np.bitwise_or.reduceat(payload << shift, s_idx) if n else np.zeros(0, np.int64)
    bad = (need != got) | (cp > 0x10FFFF)
    return char_id, cp, bad


class TokenStrings:
    """Token id -> display string, each token decoded on its own (cached).

    A token that is only part of a multibyte character (byte-level BPE splitting an Arabic
    letter, say) does not decode on its own; its bytes are shown as the valid characters they
    hold plus backslash escapes (\\xd8) for the rest, so concatenating the strings of a token
    run and reading the escapes back gives the original bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._bytes = byte_decoder()
        self._vocab_bytes: list[bytes | None] | None = None

    def __call__(self, ids) -> list[str]:
        return [self.one(int(i)) for i in np.asarray(ids).reshape(-1)]

    def one(self, i: int) -> str:
        s = self._cache.get(i)
        if s is None:
            s = self.tokenizer.decode([i], clean_up_tokenization_spaces=False)
            raw = self.tokenizer.convert_ids_to_tokens(i) or ""
            if "\ufffd" in s:
                if raw and all(ch in self._bytes for ch in raw):  # byte-level BPE
                    s = bytes(self._bytes[ch] for ch in raw).decode("utf-8", "backslashreplace")
                elif raw:  # e.g. SentencePiece byte fallback "<0xD8>" says it best
                    s = raw
            elif raw.startswith("\u2581") and not s.startswith(" "):
                s = " " + s  # SentencePiece drops a word-initial space when decoding one token
            self._cache[i] = s
        return s

    def window(self, ids) -> list[str]:
        """Display strings of a run of tokens, decoded in context: a character whose bytes span
        several tokens (byte-level BPE splitting an Arabic letter) is shown whole on the token
        that holds its first byte, and a token holding only the rest of it shows as "". Bytes
        cut at the run's edges, special tokens and unknown bytes keep `one`'s rendering."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self._vocab_bytes is None:
            self._vocab_bytes = token_bytes(self.tokenizer)
        raw = [self._vocab_bytes[i] if i < len(self._vocab_bytes) else None for i in ids]
        out = [self.one(i) if not b else "" for i, b in zip(ids, raw)]
        owner = [k for k, b in enumerate(raw) if b for _ in b]  # byte -> its token
        buf = b"".join(b for b in raw if b)
        p = 0
        while p < len(buf):
            n = _utf8_length(buf, p)
            out[owner[p]] += buf[p:p + n].decode("utf-8", "backslashreplace")
            p += n
        return out


def _utf8_length(buf: bytes, p: int) -> int:
    """Bytes of the UTF-8 character starting at buf[p]; 1 for a byte that does not start a
    complete valid character (it is then shown as an escape)."""
    lead = buf[p]
    n = 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 \
        else 4 if 0xF0 <= lead < 0xF5 else 1
    if n > 1:
        try:
            buf[p:p + n].decode("utf-8")
        except UnicodeDecodeError:
            return 1
    return n
