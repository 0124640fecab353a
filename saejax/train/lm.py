"""Train a language model (by default the Towards Monosemanticity one-layer model) on a token
dataset, with the SAE engine's conventions, and save it as a Hugging Face directory.

    cfg = load_lm_train_config("lm.yaml", ["data.tokens=data/tokens", "train.run_dir=runs/lm"])
    summary = train_lm(cfg)   # -> runs/lm/{config.yaml, metrics.jsonl, checkpoints/, hf/}

Conventions (as the SAE loop, `saejax.train.loop`, whose run plumbing it shares:
`saejax.train.runner`): one jitted step whose shardings and donation are declared in one place
(`LMStepContract`), the batch [B, ctx_len] sharded over `batch`, the model and its optimizer
moments laid out by the logical-axis rules table (replicated today); the state is created already
sharded (`jax.jit(init, out_shardings=...)`); metrics are read back on log steps only; the data
position is a pure function of the step; checkpoints hold everything else, so a run restarted
from its run directory continues bit for bit. This file holds what is specific to LMs: model,
loss, data order, validation, the Hugging Face save.

Loss. Next-token cross-entropy, mean over the B × (ctx_len − 1) predicted positions, computed in
float32. Nothing is masked: position 0 (the BOS in `every_context` datasets) is never a target,
and a BOS/EOS in the middle of a context marks a document boundary, which is worth predicting
(GPT-2 was trained that way). Attention is not masked at document boundaries (ordinary packing).

Data. The last `data.val_contexts` contexts of the dataset are held out; training draws from the
others in epochs, each a permutation seeded by (seed, epoch) (`saejax.data.order`), and step s
takes positions [s·B, (s+1)·B) of that endless stream (a batch may straddle two epochs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from saejax import config as config_lib
from saejax import paths, sharding
from saejax.config import ConfigError, MeshConfig
from saejax.typedconfig import check_ranges
from saejax.data.order import epoch_order
from saejax.data.provider import HostProvider
from saejax.lm.model import ACTIVATIONS, LM, LMConfig
from saejax.train.runner import (MetricsFile, Runner, Throughput, compile_step, due, n_params,
                                 prepare_run_dir, read_back, start_record, storage_errors)
from saejax.train.schedule import lr_schedule

F32 = jnp.float32


# ---------------------------------------------------------------- configuration


@dataclass
class LMModelConfig:
    """The architecture, as transformers' GPT2Config fields (defaults: the paper's model)."""

    n_layer: int = 1
    """Transformer blocks (Towards Monosemanticity: 1)."""
    n_embd: int = 128
    """d_model, the residual stream width (paper: 128)."""
    n_head: int = 4
    """Attention heads; must divide n_embd."""
    n_inner: int = 512
    """MLP width (paper: 512, the activations the SAE is trained on)."""
    activation_function: str = "relu"
    """MLP nonlinearity, a transformers name (paper: relu)."""
    n_positions: int = 0
    """Learned positions; 0 = the dataset's ctx_len."""
    vocab_size: int = 0
    """0 = the dataset tokenizer's vocabulary size."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm ε."""
    tie_word_embeddings: bool = False
    """Share the unembedding with the token embedding. Off: the Anthropic models this reproduces
    keep W_U separate (it costs vocab × n_embd parameters)."""


@dataclass
class LMDataConfig:
    tokens: str = ""
    """Token dataset directory (`saejax.text.tokens.write_token_dataset`)."""
    val_contexts: int = 512
    """The last this-many contexts are held out for the validation loss; 0 = no validation."""
    tokenizer: str = ""
    """Tokenizer directory copied into run_dir/hf; "" = the dataset manifest's tokenizer when that
    names a local directory holding tokenizer files (else none is copied)."""


@dataclass
class LMOptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    warmup_steps: int = 200
    """Linear warm-up: step s (0-based) uses lr·(s+1)/warmup_steps."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """LR shape after warm-up, down to lr·min_lr_ratio at the last step."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of `lr` (cosine/linear)."""
    b1: float = 0.9
    """AdamW β1."""
    b2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    weight_decay: float = 0.1
    """Decoupled weight decay, on matrices and embeddings only (not biases or norm scales)."""
    grad_clip: float = 1.0
    """Clip gradients to this global norm; 0 = off."""


@dataclass
class LMRunConfig:
    steps: int = 10_000
    """Optimizer steps. Fixes the LR schedule, so it cannot change when a run is resumed."""
    batch_size: int = 64
    """Global batch size in contexts, split over the `data` axis."""
    seed: int = 0
    """Seed of parameter init and data order."""
    log_every: int = 50
    """Read metrics back every this many steps (the only host syncs of ordinary steps)."""
    eval_every: int = 500
    """Validation loss every this many steps (and at the end); 0 = at the end only."""
    checkpoint_every: int = 1000
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """Keep the newest N checkpoints."""
    async_checkpointing: bool = True
    """Write checkpoints in the background."""
    run_dir: str = "runs/lm"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, hf/. An existing run is resumed."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class LMTrainConfig:
    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    optim: LMOptimConfig = field(default_factory=LMOptimConfig)
    train: LMRunConfig = field(default_factory=LMRunConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    """`data` = -1 uses all devices; an explicit data × model uses the first that many (one
    process). The model is replicated (the rules table maps LM axes to no mesh axis)."""


# Fields that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = {
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpointing", "train.run_dir", "train.progress", "data.tokens",
    "data.tokenizer", "mesh.data", "mesh.model",
}  # fmt: skip  (data.tokens may move: the dataset itself is checked by content)


def load_lm_train_config(path: str | os.PathLike | None = None,
                         overrides: list[str] = ()) -> LMTrainConfig:
    """Defaults <- YAML file <- dotted `a.b=value` overrides (as `saejax.config.load_config`)."""
    return config_lib.load_dataclass(LMTrainConfig, path, overrides)


RANGES = {
    "model.n_layer": ">= 1", "model.n_embd": ">= 1", "model.n_head": ">= 1",
    "model.n_inner": ">= 1", "model.n_positions": ">= 0", "model.vocab_size": ">= 0",
    "model.layer_norm_epsilon": "> 0",
    "data.val_contexts": ">= 0",
    "optim.lr": "> 0", "optim.warmup_steps": ">= 0", "optim.min_lr_ratio": "[0, 1]",
    "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.eps": "> 0", "optim.weight_decay": ">= 0",
    "optim.grad_clip": ">= 0",
    "train.steps": ">= 1", "train.batch_size": ">= 1", "train.seed": ">= 0",
    "train.log_every": ">= 1", "train.eval_every": ">= 0", "train.checkpoint_every": ">= 1",
    "train.keep_checkpoints": ">= 1",
    "mesh.data": "-1 or >= 1", "mesh.model": ">= 1", "mesh.sae": "[1, 1]",  # no sweeps of LMs
}  # fmt: skip
"""The range of every numeric field (`typedconfig.check_ranges`; NaN/Inf is rejected for all)."""


def validate(cfg: LMTrainConfig) -> None:
    """Field checks that need no dataset (`_check_against_data` does the rest)."""
    m, d = cfg.model, cfg.data
    check_ranges(cfg, RANGES)
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_head={m.n_head} must divide model.n_embd={m.n_embd}")
    if m.activation_function not in ACTIVATIONS:
        raise ConfigError(f"model.activation_function {m.activation_function!r} not one of "
                          f"{sorted(ACTIVATIONS)}")
    if not d.tokens:
        raise ConfigError("data.tokens: the token dataset directory is required")


# ---------------------------------------------------------------- model, loss, optimizer


def to_lm_config(cfg: LMModelConfig, ctx_len: int, vocab_size: int) -> LMConfig:
    """The saejax architecture, through transformers' GPT2Config and the GPT-2 family mapping
    (the same translation `load_lm` applies to the saved directory)."""
    from transformers import GPT2Config

    from saejax.lm import gpt2

    return gpt2.config_from_hf(GPT2Config(
        vocab_size=cfg.vocab_size or vocab_size, n_positions=cfg.n_positions or ctx_len,
        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
        activation_function=cfg.activation_function, layer_norm_epsilon=cfg.layer_norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=None, eos_token_id=None))


def next_token_losses(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """float32 [B, T-1]: cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(F32), tokens[:, 1:])


def schedule(o: LMOptimConfig, steps: int) -> Callable[[jax.Array], jax.Array]:
    """Step (0-based) -> learning rate: linear warm-up, then `decay` to lr·min_lr_ratio."""
    return lr_schedule(o.lr, o.warmup_steps, o.decay, steps, o.min_lr_ratio)


def make_optimizer(o: LMOptimConfig, steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip else adamw


# Parameters live in the state as a nested dict of arrays keyed by the LM's parameter path
# ("blocks" -> "0" -> "attn" -> "wq"): plain pytrees for Orbax and optax, merged into the NNX
# module inside the jitted functions.


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        *head, last = name.split(".")
        node = out
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


@struct.dataclass
class LMTrainState:
    step: jax.Array
    """int32 scalar: optimizer steps completed."""
    params: dict
    """LM parameters, nested dict keyed by parameter path."""
    opt_state: Any
    """optax state of `params`."""
    loss_sum: jax.Array
    """float32 scalar: sum of the training losses of the current logging window."""
    nonfinite_step: jax.Array
    """int32 scalar: first step (0-based) whose loss was NaN/Inf, or -1."""


@dataclasses.dataclass
class LMStepContract:
    """Shardings, donation and compiled functions of one LM run, declared in one place.

    step_fn(state, tokens[B, T]) -> (state, metrics)       state donated; tokens over `batch`
    eval_fn(params, tokens[B, T], weights[B]) -> [2]       (Σ weight·token loss, Σ weight·(T-1))
    init_fn() -> state                                     created with the state's shardings
    The state follows the logical-axis rules table (parameters and their moments alike); metrics
    and eval sums are replicated.
    """

    mesh: Mesh
    lm_config: LMConfig
    graphdef: Any
    tx: optax.GradientTransformation
    state_shardings: LMTrainState
    batch_sharding: NamedSharding
    weight_sharding: NamedSharding
    step_fn: Callable
    eval_fn: Callable
    init_fn: Callable

    @classmethod
    def build(cls, cfg: LMTrainConfig, lm_cfg: LMConfig, mesh: Mesh) -> "LMStepContract":
        seed, log_every = cfg.train.seed, cfg.train.log_every
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LM(lm_cfg, rngs=nnx.Rngs(0))))
        variables = {".".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(abstract)}
        tx = make_optimizer(cfg.optim, cfg.train.steps)
        lr_at = schedule(cfg.optim, cfg.train.steps)

        def merge(params: dict) -> LM:
            flat = config_lib.flatten(params)
            return nnx.merge(graphdef, nnx.from_flat_state(
                [(p, v.replace(value=flat[name])) for name, (p, v) in variables.items()]))

        def init() -> LMTrainState:
            _, state = nnx.split(LM(lm_cfg, rngs=nnx.Rngs(seed)))
            params = _nest({".".join(map(str, p)): v.get_value()
                            for p, v in nnx.to_flat_state(state)})
            return LMTrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), loss_sum=jnp.zeros((), F32),
                                nonfinite_step=jnp.full((), -1, jnp.int32))

        def train_step(state: LMTrainState, tokens: jax.Array):
            def loss_fn(params):
                return next_token_losses(merge(params)(tokens), tokens).mean()

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            loss_sum = jnp.where(state.step % log_every == 0, 0.0, state.loss_sum) + loss
            bad = (state.nonfinite_step < 0) & ~jnp.isfinite(loss)
            new = state.replace(
                step=state.step + 1, params=optax.apply_updates(state.params, updates),
                opt_state=opt_state, loss_sum=loss_sum,
                nonfinite_step=jnp.where(bad, state.step, state.nonfinite_step))
            metrics = {"loss": loss, "loss_sum": loss_sum, "grad_norm": optax.tree.norm(grads),
                       "lr": lr_at(state.step)}
            return new, metrics

        def eval_sums(params: dict, tokens: jax.Array, weights: jax.Array) -> jax.Array:
            per_row = next_token_losses(merge(params)(tokens), tokens).sum(axis=1)
            n = tokens.shape[1] - 1
            return jnp.stack([jnp.sum(weights * per_row), jnp.sum(weights) * n])

        # -- the contract
        rep = sharding.replicated(mesh)
        param_sh = _nest({name: sharding.named(mesh, v.get_metadata().get("out_sharding"))
                          for name, (_, v) in variables.items()})
        opt_sh = sharding.optimizer_shardings(tx, jax.eval_shape(init).opt_state, param_sh, mesh)
        state_sh = LMTrainState(step=rep, params=param_sh, opt_state=opt_sh, loss_sum=rep,
                                nonfinite_step=rep)
        batch_sh = sharding.named(mesh, ("batch", None))  # [B, T]
        weight_sh = sharding.named(mesh, ("batch",))
        return cls(
            mesh, lm_cfg, graphdef, tx, state_sh, batch_sh, weight_sh,
            step_fn=jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                            out_shardings=(state_sh, rep), donate_argnums=(0,)),
            eval_fn=jax.jit(eval_sums, in_shardings=(param_sh, batch_sh, weight_sh),
                            out_shardings=rep),
            init_fn=jax.jit(init, out_shardings=state_sh),
        )

    def abstract_state(self) -> LMTrainState:
        """Shapes, dtypes and shardings of the state (the checkpoint restore target)."""
        return sharding.abstract(jax.eval_shape(self.init_fn), self.state_shardings)

    def compile(self, batch_size: int, ctx_len: int,
                with_eval: bool = True) -> tuple[Callable, Callable | None, Any]:
        """Ahead-of-time compiled (step_fn, eval_fn or None) for these shapes, and the step's
        memory analysis (None where the backend gives none)."""
        tokens = jax.ShapeDtypeStruct((batch_size, ctx_len), jnp.int32,
                                      sharding=self.batch_sharding)
        weights = jax.ShapeDtypeStruct((batch_size,), F32, sharding=self.weight_sharding)
        state = self.abstract_state()
        step, memory = compile_step(self.step_fn, state, tokens)
        ev = self.eval_fn.lower(state.params, tokens, weights).compile() if with_eval else None
        return step, ev, memory


# ---------------------------------------------------------------- data


def batch_indices(step: int, batch_size: int, n_train: int, seed: int) -> np.ndarray:
    """Context indices of step `step`'s global batch: positions [step·B, (step+1)·B) of the
    stream of epochs, epoch e being a permutation of range(n_train) seeded by (seed, e)."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    return epoch_order(pos, n_train, lambda e: (seed, e))


class TrainContexts:
    """The training contexts in step order, read per process by `HostProvider`."""

    def __init__(self, dataset, n_train: int, seed: int):
        self.dataset, self.n_train, self.seed = dataset, n_train, seed

    def rows(self, step: int, start: int, stop: int, batch_size: int) -> np.ndarray:
        """Contexts [start, stop) of step `step`'s global batch, int32 [stop-start, ctx_len]."""
        idx = batch_indices(step, batch_size, self.n_train, self.seed)
        return self.dataset.take(idx[start:stop])


def _dataset_id(dataset) -> str:
    """Content identity of a token dataset: sha256 over its shards' checksums and shape."""
    m = dataset.manifest
    text = json.dumps([m["ctx_len"], m["n_contexts"], [s["sha256"] for s in m["shards"]]])
    return hashlib.sha256(text.encode()).hexdigest()


def _special_ids(dataset) -> dict:
    """bos/eos token ids for config.json, from the dataset manifest."""
    m = dataset.manifest
    tok = m.get("tokenizer", {})
    bos = m.get("bos_id")
    eos = m.get("sep_id") if m.get("separator") == "eos" else None
    if eos is None and tok.get("eos_token") is not None and tok.get("eos_token") == tok.get(
            "bos_token"):
        eos = bos
    return {"bos_token_id": bos, "eos_token_id": eos}


# ---------------------------------------------------------------- the loop


def _make_mesh(cfg: MeshConfig) -> Mesh:
    devices = jax.devices()
    if cfg.data != -1 and jax.process_count() == 1:
        devices = devices[: cfg.data * cfg.model]
    return sharding.make_mesh(cfg, devices)


def _check_against_data(cfg: LMTrainConfig, dataset, mesh: Mesh) -> LMConfig:
    """The checks `validate` cannot do without the dataset and the mesh; returns the LMConfig."""
    t, ctx, n_val = cfg.train, dataset.ctx_len, cfg.data.val_contexts
    if dataset.n_contexts - n_val < 1:
        raise ConfigError(f"data.val_contexts={n_val} leaves no training contexts of the "
                          f"{dataset.n_contexts} in {cfg.data.tokens}")
    lm_cfg = to_lm_config(cfg.model, ctx, dataset.vocab_size)
    if lm_cfg.n_ctx < ctx:
        raise ConfigError(f"model.n_positions={lm_cfg.n_ctx} < the dataset's ctx_len={ctx}")
    if lm_cfg.vocab_size < dataset.vocab_size:
        raise ConfigError(f"model.vocab_size={lm_cfg.vocab_size} < the dataset tokenizer's "
                          f"{dataset.vocab_size}")
    n_data = sharding.axis_size(mesh, "batch")
    if t.batch_size % n_data:
        raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of the "
                          f"{n_data} devices of the data axis")
    return lm_cfg


def _tokenizer_dir(cfg: LMTrainConfig, dataset) -> str | None:
    """data.tokenizer, else the packer's tokenizer if it was a local tokenizer directory."""
    from saejax.lm.save import tokenizer_files

    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    name = dataset.manifest.get("tokenizer", {}).get("name_or_path") or ""
    return name if name and tokenizer_files(name) else None


def format_summary(s: dict) -> str:
    parts = [f"step {s['step']}"]
    if s["train_loss"] is not None:
        parts.append(f"train loss {s['train_loss']:.4f}")
    if s["val_loss"] is not None:
        parts.append(f"val loss {s['val_loss']:.4f}")
    if s["tokens_per_s"]:
        parts.append(f"{s['tokens_per_s']:.4g} tokens/s")
    if s["hf_dir"]:
        parts.append(f"saved {s['hf_dir']}")
    return "  ".join(parts)


def train_lm(cfg: LMTrainConfig, *, stop_at: int | None = None, quiet: bool = False) -> dict:
    """Train (or resume) the LM run in cfg.train.run_dir; save run_dir/hf; return the summary.

    stop_at: stop after this many steps (checkpointed there), as a preempted job would; calling
        again with the same config continues to cfg.train.steps. The hf/ directory is written
        only when the run reaches cfg.train.steps.
    """
    from saejax.text.tokens import TokenDataset

    validate(cfg)
    t = cfg.train
    dataset = TokenDataset(cfg.data.tokens)
    mesh = _make_mesh(cfg.mesh)
    lm_cfg = _check_against_data(cfg, dataset, mesh)
    ctx, n_val = dataset.ctx_len, cfg.data.val_contexts
    n_train = dataset.n_contexts - n_val
    run_dir = paths.as_path(t.run_dir)
    prepare_run_dir(run_dir, cfg, RESUMABLE_CHANGES)

    contract = LMStepContract.build(cfg, lm_cfg, mesh)
    step_fn, eval_fn, memory = contract.compile(t.batch_size, ctx, with_eval=n_val > 0)
    data = HostProvider(TrainContexts(dataset, n_train, t.seed), mesh, t.batch_size)
    meta = {"config": dataclasses.asdict(cfg), "dataset": _dataset_id(dataset)}
    stop = t.steps if stop_at is None else min(stop_at, t.steps)
    tok_per_step = t.batch_size * ctx

    def val_loss(params) -> float | None:
        return _val_loss(eval_fn, params, dataset, n_train, t.batch_size, mesh) if n_val else None

    with Runner(run_dir, keep=t.keep_checkpoints, async_save=t.async_checkpointing,
                meta=meta) as runner:
        restored = runner.restore(contract.abstract_state())
        if restored is not None:
            start, state, saved = restored
            if saved.get("dataset") != meta["dataset"]:
                raise ConfigError(f"the checkpoint in {run_dir} was trained on another token "
                                  f"dataset than {cfg.data.tokens} (content differs)")
        else:
            start, state = 0, contract.init_fn()
        with MetricsFile(run_dir, start_step=start, total_steps=t.steps, runner=runner,
                         progress=t.progress and not quiet) as log:
            if start == 0:
                log.write(start_record(mesh, state.params, tok_per_step, memory))
            clock = Throughput(start, tok_per_step)
            last = {"train_loss": None, "val_loss": None}

            def on_step(done: int, state, metrics: dict):
                record = None
                if due(done, t.log_every, stop):
                    (m,) = read_back(state, metrics)
                    n_window = (done - 1) % t.log_every + 1
                    record = {"step": done, "train_loss": float(m["loss_sum"]) / n_window,
                              "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                              "lr": float(m["lr"]), "tokens_seen": done * tok_per_step,
                              "tokens_per_s": clock.rate(done)}
                    last["train_loss"] = record["train_loss"]
                if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                    record = record or {"step": done}
                    record["val_loss"] = last["val_loss"] = val_loss(state.params)
                saved = due(done, t.checkpoint_every, stop)
                if saved:
                    runner.save(done, state, meta)
                if record is not None:
                    log.write(record)
                    log.show(done, loss=f"{last['train_loss']:.4g}",
                             tok_s=f"{record.get('tokens_per_s', 0):.3g}")
                if record is not None or saved:  # the device is idle: host work is not step time
                    clock.restart(done)
                return state

            state = runner.loop(state, step_fn, data.batches(start, stop), start, stop, on_step)
            if stop == t.steps and last["val_loss"] is None:  # a finished run called again
                last["val_loss"] = val_loss(state.params)
            summary = {"step": stop, **last, "tokens_seen": stop * tok_per_step,
                       "n_params": n_params(state.params), "tokens_per_s": clock.mean(),
                       "hf_dir": None}
            if stop == t.steps:
                with storage_errors(run_dir):
                    hf_dir = _save_hf(run_dir / "hf", state.params, lm_cfg,
                                      _tokenizer_dir(cfg, dataset), **_special_ids(dataset))
                summary["hf_dir"] = str(hf_dir)
                log.write({"event": "summary", **summary})
    if not quiet and jax.process_index() == 0:
        print(format_summary(summary))
    return summary


def _save_hf(out: paths.AnyPath, params, lm_cfg: LMConfig, tokenizer_dir, **special_ids):
    """`saejax.lm.save.save_hf` into `out`, replacing it; a URL's is written locally and uploaded
    by process 0 (the one that writes), config.json last (`saejax.atomic.atomic_dir`)."""
    from saejax.atomic import atomic_dir
    from saejax.lm.save import save_hf

    if not paths.is_url(out):
        return save_hf(params, lm_cfg, out, tokenizer_dir, overwrite=True, **special_ids)
    if jax.process_index() == 0:
        with atomic_dir(out, last="config.json") as tmp:
            save_hf(params, lm_cfg, tmp, tokenizer_dir, overwrite=True, **special_ids)
    return out


def _val_loss(eval_fn, params, dataset, n_train: int, batch_size: int, mesh: Mesh) -> float:
    """Mean next-token loss over the held-out contexts (those after the n_train training ones),
    in batches of batch_size, the last one padded with zero-weight rows."""
    row_start, row_stop = sharding.process_rows(mesh, batch_size)
    total = None
    for i in range(n_train, dataset.n_contexts, batch_size):
        idx = np.arange(i, min(i + batch_size, dataset.n_contexts))
        w = np.zeros(batch_size, np.float32)
        w[:len(idx)] = 1.0
        tokens = np.zeros((batch_size, dataset.ctx_len), np.int32)
        tokens[:len(idx)] = dataset.take(idx)
        sums = eval_fn(params, sharding.host_batch_to_global(tokens[row_start:row_stop], mesh),
                       sharding.host_batch_to_global(w[row_start:row_stop], mesh))
        total = sums if total is None else total + sums
    loss_sum, count = jax.device_get(total)
    return float(loss_sum / count)
