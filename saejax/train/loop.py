"""The SAE training loop: restore or init, step, resample, log, checkpoint, summarise.

The run plumbing (run directory, checkpoints, metrics file, step dispatch, NaN/Inf gate) is
`saejax.train.runner`'s, shared with the LM trainer; data comes from one batch provider
(`saejax.data.make_provider`). Data position is a pure function of the step, and everything
else lives in the checkpointed `TrainState`, so a run restarted from its run directory
continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import jax
import numpy as np

from saejax import config as config_lib
from saejax import paths, sharding
from saejax.config import Config, ConfigError
from saejax.errors import NonFiniteLossError
from saejax.sweep import FILENAME as SWEEP_FILE, Sweep, save_sweep
from saejax.typedconfig import read_yaml
from saejax.data import make_provider, relocated, with_absolute_paths
from saejax.sae import get_family
from saejax.sae.stats import dead_fraction, density_summary, heldout_metrics
from saejax.sharding import make_mesh, to_host
from saejax.train.runner import (MetricsFile, Runner, Throughput, all_finite, compile_step, due,
                                 prepare_run_dir, read_back, start_record)
from saejax.train import state as state_lib
from saejax.train.memory import check_memory
from saejax.train.resample import CHUNK, resample
from saejax.train.step import StepContract

# Config fields that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = {"train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.async_checkpointing", "train.tensorboard",
                     "train.progress", "train.run_dir", "train.dead_window_tokens",
                     "train.fail_on_frozen",
                     "mesh.data", "mesh.model", "mesh.sae"}
INIT_SAMPLE = 16_384  # rows for the geometric median / input scale
EVAL_ROWS = 32_768


def resumable_changes(cfg: Config) -> set[str]:
    """RESUMABLE_CHANGES, plus train.steps when the run's length shapes nothing it computes: a
    constant LR, no resampling at fractions of the run, and hyperparameters (λ warm-up, dead
    windows) that are not fractions of the run. Otherwise a longer run would silently differ
    from the run that was started."""
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                steps=2 * cfg.train.steps))
    resamples = bool(config_lib.resample_steps(cfg))
    now, then = state_lib.hparams(cfg), state_lib.hparams(longer)
    same_hparams = all(float(now[k]) == float(then[k]) for k in now
                       if resamples or not k.startswith("resample_"))
    fixed_length = (cfg.optim.decay == "constant" and same_hparams
                    and not (cfg.resample.at_fractions and resamples))
    return RESUMABLE_CHANGES | ({"train.steps"} if fixed_length else set())


def recorded_view(run_dir: paths.AnyPath):
    """How a run's recorded config is compared with a command's: data paths absolute, and found
    again next to the run directory when it moved with its data."""
    def view(tree: dict) -> dict:
        cfg = config_lib.from_dict(Config, tree)
        return config_lib.to_dict(with_absolute_paths(relocated(cfg, run_dir)))
    return view


def check_resumable(saved: dict, cfg: Config) -> None:
    """Refuse `cfg` for the run whose saved config is `saved`, as `train` would on resume."""
    view = recorded_view(paths.as_path(cfg.train.run_dir))
    config_lib.check_same_run(view(saved), view(config_lib.to_dict(cfg)), resumable_changes(cfg),
                              cfg.train.run_dir)


def sample_rows(data, n: int, seed: int, mesh) -> jax.Array:
    """A deterministic sample of about n rows from the batch provider `data`, as a global array
    (n rounded down so the `batch` axis divides it)."""
    return data.sample(n - n % sharding.axis_size(mesh, "batch"), seed)


def init_from_data(contract: StepContract, data, cfg: Config, mesh):
    """A fresh state, initialised from a data sample (input scale, geometric median); refused
    when that made it NaN/Inf: the data holds NaN/Inf values, and every loss would be NaN.
    The sample depends on data.seed only, so sweep members that differ in train.seed share it."""
    state = contract.init(sample_rows(data, INIT_SAMPLE, cfg.data.seed, mesh))
    if not all_finite(state):
        raise ConfigError(f"data.source={cfg.data.source}: the data holds NaN or Inf values (the "
                          f"SAE initialised from {INIT_SAMPLE} sampled rows is not finite)")
    return state


def resample_chunks(data, cfg: Config, seed: int, mesh):
    """About resample.n_inputs rows for a resampling event, one chunk at a time (drawn only as
    the resampler asks: never all at once, and not at all when no feature is dead)."""
    n = cfg.resample.n_inputs
    chunk = min(CHUNK, n)
    for i in range(-(-n // chunk)):
        yield sample_rows(data, chunk, seed * 1009 + i, mesh)


def dead_window_steps(cfg: Config) -> int:
    return -(-cfg.train.dead_window_tokens // cfg.train.batch_size)


def log_record(step: int, metrics: dict, last_fired: np.ndarray, fire_count: np.ndarray,
               cfg: Config) -> dict:
    """The metrics.jsonl record of log step `step` (from host values): the step's metrics, the
    dead fraction over the dead window, the dense fraction and density histogram of the
    logging window (`saejax.sae.stats`)."""
    t = cfg.train
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    window_tokens = ((step - 1) % t.log_every + 1) * t.batch_size
    record["dead_fraction"] = dead_fraction(step, last_fired, dead_window_steps(cfg))
    record.update(density_summary(fire_count, window_tokens))
    return record


@dataclasses.dataclass
class Part:
    """One compiled step of a run: a single SAE, or one group of a sweep (its members' states
    stacked, `StepContract.members`)."""

    contract: StepContract
    key: str | None
    """The key of its state in a sweep's checkpointed dict; None: the state is the part's."""
    names: tuple[str, ...] = ()
    """Its members' names (a sweep group), () for a single SAE."""

    @property
    def cfgs(self) -> tuple[Config, ...]:
        return self.contract.members or (self.contract.cfg,)


def build_parts(cfg: Config, sweep: Sweep | None, mesh) -> list[Part]:
    if sweep is None:
        return [Part(StepContract.build(cfg, mesh), None)]
    return [Part(StepContract.build(g.cfg, mesh, tuple(m.cfg for m in g.members)), g.name,
                 tuple(m.name for m in g.members)) for g in sweep.groups]


def check_sweep(sweep: Sweep, n_devices: int) -> None:
    """Every member valid on these devices, every group divisible over the `sae` axis."""
    for m in sweep.members:
        try:
            config_lib.validate(m.cfg, n_devices)
        except ConfigError as e:
            raise ConfigError(f"sweep member {m.name}: {e}") from None
    n = sweep.base.mesh.sae
    for g in sweep.groups:
        if len(g.members) % n:
            raise ConfigError(f"mesh.sae={n} does not divide the {len(g.members)} members of "
                              f"the group of {g.members[0].name}; make it a divisor")


def train(cfg: Config, *, quiet: bool = False, sweep: Sweep | None = None) -> dict:
    """Train (or resume) the run in cfg.train.run_dir; returns the final summary (a sweep's:
    {member: summary}). A sweep (`saejax.sweep`) trains every member in one loop on the same
    batches, cfg being its base config."""
    config_lib.validate(cfg, jax.device_count())
    if sweep is not None:
        check_sweep(sweep, jax.device_count())
    t = cfg.train
    run_dir = paths.as_path(t.run_dir)
    n_data, n_model = config_lib.resolve_mesh_shape(cfg.mesh, jax.device_count())
    for c in (sweep.groups if sweep else [None]):
        per_device = 1 if c is None else -(-len(c.members) // cfg.mesh.sae)
        check_memory(cfg if c is None else c.cfg, n_data, n_model, eval_rows=EVAL_ROWS,
                     chunk_rows=CHUNK, members=per_device)
    mesh = make_mesh(cfg.mesh)
    data = make_provider(cfg, mesh)  # a data path or shape at fault is refused before any write
    check_sweep_dir(run_dir, sweep)
    prepare_run_dir(run_dir, cfg, resumable_changes(cfg), view=recorded_view(run_dir))
    if sweep is not None and jax.process_index() == 0:
        save_sweep(sweep, run_dir)
    parts = build_parts(cfg, sweep, mesh)
    batch = jax.ShapeDtypeStruct((t.batch_size, cfg.sae.d_in), data.batch_dtype,
                                 sharding=parts[0].contract.batch_sharding)
    compiled = [compile_step(p.contract.step_fn, p.contract.abstract_state(), batch)
                for p in parts]
    meta = {"config": config_lib.to_dict(cfg), **({"sweep": sweep.to_dict()} if sweep else {})}
    group = Groups(parts, [c[0] for c in compiled])

    with Runner(run_dir, keep=t.keep_checkpoints, async_save=t.async_checkpointing,
                meta=meta) as runner:
        restored = runner.restore(group.pack([p.contract.abstract_state() for p in parts]))
        start, state = ((restored[0], restored[1]) if restored is not None else
                        (0, group.pack([init_from_data(p.contract, data, cfg, mesh)
                                        for p in parts])))
        with MetricsFile(run_dir, start_step=start, total_steps=t.steps, runner=runner,
                         tensorboard=t.tensorboard, progress=t.progress and not quiet) as log:
            if start == 0:
                log.write(start_record(mesh, state_params(state), t.batch_size,
                                       sum_memory([c[1] for c in compiled])))
            clock = Throughput(start, t.batch_size)
            resample_at = set(config_lib.resample_steps(cfg))

            def on_step(done: int, state, metrics: dict):
                # Logged before resampling, so the record describes the state this step ran with.
                if due(done, t.log_every, t.steps):
                    rate = clock.rate(done)
                    records = group.log_records(done, state, metrics, cfg)
                    for record in records:
                        log.write({**record, "tokens_per_s": rate}
                                  if "event" not in record else record)
                    first = next(r for r in records if "loss" in r) if records else None
                    if first is not None:
                        log.show(done, loss=f"{first['loss']:.4g}", l0=f"{first['l0']:.1f}",
                                 tok_s=f"{rate:.3g}")
                if done in resample_at:
                    states = []
                    for part, s in zip(parts, group.unpack(state)):
                        chunks = resample_chunks(data, cfg, cfg.data.seed * 7919 + done, mesh)
                        s, n_dead = resample(part.contract, s, chunks)
                        states.append(s)
                        for name, n in zip(part.names or [None], np.atleast_1d(n_dead)):
                            log.write({"step": done, "event": "resample", "n_resampled": int(n),
                                       **({"member": name} if name else {})})
                    state = group.pack(states)
                if due(done, t.checkpoint_every, t.steps):
                    runner.save(done, state, meta)
                return state

            state = runner.loop(state, group.step, data.batches(start, t.steps), start, t.steps,
                                on_step)
            summaries = group.summaries(state, data, mesh, cfg)
            for name, summary in summaries.items():
                log.write({"step": t.steps, "event": "summary",
                           **({"member": name} if name else {}), **summary})
    if not quiet and jax.process_index() == 0:
        for name, summary in summaries.items():
            print((f"{name}: " if name else "") + format_summary(summary))
    if sweep is None:
        return summaries[None]
    frozen = [n for n, s in summaries.items() if "frozen_at" in s]
    if frozen and t.fail_on_frozen:
        raise NonFiniteLossError(f"sweep members whose loss became NaN/Inf (frozen): "
                                 f"{', '.join(frozen)}")
    return summaries


def check_sweep_dir(run_dir: paths.AnyPath, sweep: Sweep | None) -> None:
    """Refuse a sweep in a single SAE's run directory, a single SAE in a sweep's, or a sweep
    whose members differ from the ones recorded there."""
    recorded = run_dir / SWEEP_FILE
    if sweep is None and recorded.is_file():
        raise ConfigError(f"{run_dir} holds a sweep ({SWEEP_FILE}); resume it with the same "
                          "--sweep arguments, or choose another train.run_dir")
    if sweep is None or not (run_dir / "config.yaml").is_file():
        return
    if not recorded.is_file():
        raise ConfigError(f"{run_dir} holds a single SAE's run, not a sweep; choose another "
                          "train.run_dir")
    saved = read_yaml(recorded, "the sweep's members")
    if saved != sweep.to_dict():
        raise ConfigError(f"{run_dir} holds a sweep with other members ({recorded}); resume it "
                          "with the same --sweep arguments, or choose another train.run_dir")


def state_params(state) -> dict:
    return ({k: s.params for k, s in state.items()} if isinstance(state, dict)
            else state.params)


def sum_memory(analyses: list):
    """The memory analysis of a run's only step, or the sum of its steps' temporaries."""
    if len(analyses) == 1 or any(a is None for a in analyses):
        return analyses[0]
    return types.SimpleNamespace(temp_size_in_bytes=sum(a.temp_size_in_bytes for a in analyses))


class Groups:
    """The state and steps of a run's parts as one: a single SAE's state is its TrainState, a
    sweep's a dict {group key: stacked TrainState} (`pack`/`unpack`); `step` runs every part
    on the same batch."""

    def __init__(self, parts: list[Part], steps: list):
        self.parts, self.steps = parts, steps

    def pack(self, states: list):
        if self.parts[0].key is None:
            return states[0]
        return {p.key: s for p, s in zip(self.parts, states)}

    def unpack(self, state) -> list:
        return [state] if self.parts[0].key is None else [state[p.key] for p in self.parts]

    def step(self, state, batch):
        out = [fn(s, batch) for fn, s in zip(self.steps, self.unpack(state))]
        return self.pack([o[0] for o in out]), self.pack([o[1] for o in out])

    def log_records(self, done: int, state, metrics, cfg: Config) -> list[dict]:
        """metrics.jsonl records of log step `done`: one per member (a single SAE: one, and a
        NaN/Inf loss stops the run), and an event for each member frozen since the previous log
        step (a function of the state, so a resumed run writes the same records)."""
        records, previous = [], (done - 1) // cfg.train.log_every * cfg.train.log_every
        for part, s, m in zip(self.parts, self.unpack(state), self.unpack(metrics)):
            trees = (m, s.last_fired, s.fire_count)
            if not part.names:
                records.append(log_record(done, *read_back(s, *trees), cfg))
                continue
            m, last_fired, fire_count, bad = to_host((*trees, s.nonfinite_step))
            for i, name in enumerate(part.names):
                if bad[i] >= 0:
                    if bad[i] + 1 > previous:
                        records.append({"step": done, "event": "frozen", "member": name,
                                        "nonfinite_step": int(bad[i]) + 1})
                        warn(f"sweep member {name}: loss became NaN/Inf at step "
                             f"{int(bad[i]) + 1}; frozen there, the others go on")
                    continue
                mi = {k: v[i] for k, v in m.items()}
                records.append({"member": name,
                                **log_record(done, mi, last_fired[i], fire_count[i], cfg)})
        return records

    def summaries(self, state, data, mesh, cfg: Config) -> dict:
        """{member name (None for a single SAE): held-out summary}, all on one sample."""
        x = sample_rows(data, EVAL_ROWS, 10_000_019 + cfg.data.seed, mesh)
        out = {}
        for part, s in zip(self.parts, self.unpack(state)):
            if not part.names:
                out[None] = summarize(part.contract.cfg, part.contract, s, data, x)
                continue
            bad = to_host(s.nonfinite_step)
            for i, (name, member) in enumerate(zip(part.names, part.cfgs)):
                summary = summarize(member, part.contract, part.contract.member_state(s, i),
                                    data, x)
                if bad[i] >= 0:
                    summary["frozen_at"] = int(bad[i]) + 1
                out[name] = summary
        return out


def warn(text: str) -> None:
    if jax.process_index() == 0:
        print(f"saejax: {text}", file=sys.stderr, flush=True)


def summarize(cfg: Config, contract: StepContract, state, data, x: jax.Array) -> dict:
    """Held-out MSE/FVU/L0 on the sample x, dead fraction over the metrics window, and the
    data's ground-truth metrics (MMCS for synthetic data)."""
    sae_cfg, params = get_family(cfg.sae.arch).for_inference(cfg.sae, state.params,
                                                             state.family_state)
    # The compiled step's module only when it is this member's (a group compiles TopK at its
    # largest k; a member of smaller k is evaluated at its own).
    graphdef = (contract.graphdef if sae_cfg == contract.cfg.sae
                else get_family(sae_cfg.arch).graphdef(sae_cfg))
    out = heldout_metrics(graphdef, params, state.input_scale, x)
    step, last_fired = to_host((state.step, state.last_fired))
    out["dead_fraction"] = dead_fraction(int(step), last_fired, dead_window_steps(cfg))
    out.update(data.summary_metrics(state.params["W_dec"]))
    out["step"] = int(step)
    return out


def format_summary(s: dict) -> str:
    parts = [f"step {s['step']}"]
    if "mmcs" in s:
        parts.append(f"MMCS {s['mmcs']:.4f}")
    parts += [f"L0 {s['l0']:.2f}", f"FVU {s['fvu']:.4f}", f"MSE {s['mse']:.4g}",
              f"dead fraction {s['dead_fraction']:.4f}"]
    return "final (held-out): " + "  ".join(parts)
