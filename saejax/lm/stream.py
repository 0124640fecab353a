"""One pass over token contexts: LM site activations, batch by batch, for every analysis.

Everything that looks at features over text (top contexts, script features, feature matching,
splice evaluation) reads the data through `site_batches`, so they all see the same contexts, the
same positions and the same BOS rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from saejax.lm.model import cache_fn


@dataclass(frozen=True)
class SiteBatch:
    index: np.ndarray
    """[B] context ids in the token dataset."""
    tokens: np.ndarray
    """[B, T] int32 token ids."""
    acts: dict[str, jax.Array]
    """{site: [B, T, d]} activations, on device."""
    mask: np.ndarray
    """[B, T] bool: positions that count (False at BOS/separator tokens when skip_bos, whose
    activations are outliers the SAE never trained on: the store drops them too)."""


def parse_contexts(spec: str, n_contexts: int) -> range:
    """'START:STOP' (python-slice style, negatives from the end; '' = all) -> range of ids."""
    try:
        start, _, stop = spec.partition(":")
        return range(n_contexts)[slice(int(start) if start else None, int(stop) if stop else None)]
    except ValueError:
        raise ValueError(f"contexts must look like START:STOP (e.g. -2000: or 0:500), "
                         f"got {spec!r}") from None


def site_batches(lm, tokens, sites: Sequence[str], contexts: Sequence[int], *,
                 batch_contexts: int = 32, skip_bos: bool = True,
                 logits: bool = False) -> Iterator[SiteBatch]:
    """Yield SiteBatch for `contexts` of the TokenDataset `tokens`, batch_contexts at a time.

    lm: a loaded `LM`. With logits=True the forward runs to the end (the batch's
    acts then also hold "logits" [B, T, vocab]); otherwise it stops after the last site.
    The last batch may be shorter (one extra compile).
    """
    fn, state = cache_fn(lm, sites, logits=logits)
    contexts = np.asarray(contexts, np.int64)
    for lo in range(0, len(contexts), batch_contexts):
        index = contexts[lo:lo + batch_contexts]
        tok = tokens.take(index)
        out, cache = fn(state, tok)
        acts = dict(cache)
        if logits:
            acts["logits"] = out
        mask = np.ones(tok.shape, bool)
        if skip_bos and tokens.bos_id is not None:
            mask &= tok != tokens.bos_id
        yield SiteBatch(index, tok, acts, mask)
