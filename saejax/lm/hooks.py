"""Hook sites: stable TransformerLens-style names, caching, splicing and early stopping.

Every block exposes, in forward order:

    blocks.{i}.hook_resid_pre    residual stream entering block i
    blocks.{i}.hook_attn_out     what attention adds to the residual stream
    blocks.{i}.hook_resid_mid    resid_pre + attn_out (sequential-residual models only)
    blocks.{i}.mlp.hook_post     MLP activations after the nonlinearity: the input of the MLP's
                                 output projection (act(gate) * up for gated MLPs)
    blocks.{i}.hook_mlp_out      what the MLP adds to the residual stream
    blocks.{i}.hook_resid_post   residual stream leaving block i (= resid_pre of block i + 1)

"Adds to the residual stream" means after any post-norm (Gemma 2's sandwich norms), so
resid_post == resid_mid + mlp_out always holds. Parallel-residual models (GPT-NeoX / Pythia) have
no resid_mid: their MLP reads resid_pre, and no tensor equals resid_pre + attn_out.

A `HookRun` is created per forward call. The model calls `run(name, x)` at each site; the run
applies a splice (x -> fn(x)), records the value the rest of the forward sees, and -- when logits
are not wanted -- raises `StopForward` once every requested site is recorded, so later layers and
the unembedding are never traced (this is Python control flow, so it holds under `jax.jit`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax

BLOCK_SITES = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)

Splice = Callable[[jax.Array], jax.Array]


def hook_names(n_layers: int, parallel_residual: bool = False) -> list[str]:
    """All valid site names, in forward order."""
    sites = [s for s in BLOCK_SITES if not (parallel_residual and s == "hook_resid_mid")]
    return [f"blocks.{i}.{s}" for i in range(n_layers) for s in sites]


class StopForward(Exception):
    """Raised inside the forward once nothing downstream is needed (never escapes the model)."""


class HookRun:
    """One forward's hook state: which sites to record, which to splice, whether logits matter."""

    def __init__(
        self,
        valid: list[str],
        cache: Iterable[str] = (),
        splices: Mapping[str, Splice] | None = None,
        need_logits: bool = True,
    ):
        self.cache_sites = list(dict.fromkeys(cache))  # dedupe, keep order
        self.splices = dict(splices or {})
        unknown = [s for s in [*self.cache_sites, *self.splices] if s not in valid]
        if unknown:
            raise ValueError(f"unknown hook site(s) {unknown}; valid names are: {', '.join(valid)}")
        self.need_logits = need_logits
        self.cache: dict[str, jax.Array] = {}
        self._pending = set(self.cache_sites)

    def check_start(self) -> None:
        """Stop before any compute when nothing at all is requested."""
        if not self.need_logits and not self._pending:
            raise StopForward

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        fn = self.splices.get(name)
        if fn is not None:
            y = fn(x)
            if y.shape != x.shape:
                raise ValueError(f"splice at {name} returned shape {y.shape}, expected {x.shape}")
            x = y.astype(x.dtype)
        if name in self._pending:
            self.cache[name] = x  # the value downstream computation sees (after any splice)
            self._pending.discard(name)
            if not self.need_logits and not self._pending:
                raise StopForward
        return x
