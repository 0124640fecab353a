"""`saejax <command>`: train, export, train-lm, tokenize, harvest, eval, analyze, browse, compare,
report, scaling, plan, config.

A user's mistake never ends in a traceback: every saejax error, and the OSError/ValueError a bad
path or value raises, is printed as one line `saejax: <kind>: <message>` (exit 2; 3 when a
loss became NaN/Inf, 4 when no checkpoint restores, 75 when a preemption notice (SIGTERM) stopped
a trainer after a checkpoint every process agreed on, 130 on Ctrl-C). Commands check what they
can before they write anything; the trainers record absolute data paths, so a run directory
does not depend on the directory the command ran in.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

README_REFERENCE = "the README's \"Config reference\" section (README.md)"
INTERRUPTED = 130  # the shell's code for a command ended by SIGINT
DEFER_S = 5.0  # the longest Ctrl-C waits for the main thread to leave Orbax code


def _maybe_init_distributed() -> None:
    """Join the multi-process run this process belongs to: SAEJAX_* variables, or a cluster JAX
    detects (SLURM, Open MPI, TPU pods, Kubernetes); else one process (saejax/cluster.py)."""
    from saejax.cluster import initialize

    initialize()


# ---------------------------------------------------------------- the trainers


def _sae_config(args):
    """The SAE config of `train`/`config --show`, data paths and run_dir made absolute; for a
    sweep (`--sweep`, or a `sweep:` section in --config), its base config."""
    return _sae_run(args)[0]


def _sae_run(args):
    """(config, sweep or None) of `train`, data paths and run_dir made absolute."""
    from saejax.config import load_config
    from saejax.data import with_absolute_paths
    from saejax.sweep import load_sweep, map_configs

    sweep = load_sweep(args.config, args.overrides, getattr(args, "sweep", None) or [])
    if sweep is None:
        return with_absolute_paths(load_config(args.config, args.overrides)), None
    sweep = map_configs(sweep, with_absolute_paths)
    return sweep.base, sweep


def _lm_config(args):
    """The LM config of `train-lm`/`config --show --lm`, local paths made absolute."""
    from saejax.files import absolute_path
    from saejax.train.lm import load_lm_train_config

    cfg = load_lm_train_config(args.config, args.overrides)
    d = cfg.data
    tokenizer = absolute_path(d.tokenizer) if os.path.isdir(d.tokenizer) else d.tokenizer
    return dataclasses.replace(
        cfg, data=dataclasses.replace(d, tokens=absolute_path(d.tokens), tokenizer=tokenizer),
        train=dataclasses.replace(cfg.train, run_dir=absolute_path(cfg.train.run_dir)))


def _finished_summary(run_dir: str, steps: int, check, n: int = 1) -> list[dict] | None:
    """The summaries (n: one per sweep member) a finished run wrote for `steps` steps, or None
    when it is not finished. The run's saved config is first checked against the command's
    (`check(saved)` raises), so a different command is refused as it would be on resume."""
    from saejax.paths import as_path

    run_dir = as_path(run_dir)
    metrics, saved = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not (metrics.is_file() and saved.is_file() and (run_dir / "checkpoints").is_dir()):
        return None
    from saejax.typedconfig import read_yaml

    check(read_yaml(saved, "the run's config"))
    summaries = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "summary":
            summaries.append(record)
    done = [r for r in summaries[-n:] if r.get("step") == steps]
    return done if len(done) == n else None


def _run_trainer(args, cfg, check, train, format_summary, n_summaries: int = 1) -> int:
    """Run `train(cfg)`, or only print the summaries when the run has already finished."""
    import jax

    args.run_dir = cfg.train.run_dir  # for the Ctrl-C message
    _maybe_init_distributed()
    done = _finished_summary(cfg.train.run_dir, cfg.train.steps, check, n_summaries)
    if done is None:
        with _ctrl_c_outside_checkpointing():
            train(cfg, quiet=args.quiet)  # prints its summary unless quiet
    elif not args.quiet and jax.process_index() == 0:
        print(f"run already complete at step {done[0]['step']} in {cfg.train.run_dir}")
        for record in done:
            member = record.get("member")
            print((f"{member}: " if member else "") + format_summary(record))
    return 0


@contextlib.contextmanager
def _ctrl_c_outside_checkpointing():
    """Ctrl-C raises KeyboardInterrupt in the trainer's own code, never inside Orbax (which logs
    the interrupted wait for a checkpoint write as an error with a traceback): while Orbax code is
    running on the main thread, the signal is sent again a moment later."""
    if (signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            or threading.current_thread() is not threading.main_thread()):
        yield  # SIGINT ignored (a background job) or handled by someone else: leave it so
        return
    active = True
    deferred_since: list[float] = []

    def again() -> None:
        if active:
            os.kill(os.getpid(), signal.SIGINT)

    def handler(signum, frame):
        # Deferred at most DEFER_S: when saves follow each other closely (tiny steps, frequent
        # checkpoints, a loaded machine) the main thread may always be inside Orbax.
        deferred_since[:] = deferred_since or [time.monotonic()]
        if time.monotonic() - deferred_since[0] < DEFER_S:
            while frame is not None:
                if frame.f_globals.get("__name__", "").startswith("orbax."):
                    threading.Timer(0.05, again).start()
                    return
                frame = frame.f_back
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        active = False
        signal.signal(signal.SIGINT, signal.default_int_handler)


def cmd_train(args) -> int:
    cfg, sweep = _sae_run(args)  # config errors before any heavy import
    from saejax.train.loop import check_resumable, format_summary, train

    if sweep is not None:
        train = functools.partial(train, sweep=sweep)
    return _run_trainer(args, cfg, lambda saved: check_resumable(saved, cfg), train,
                        format_summary, n_summaries=len(sweep.members) if sweep else 1)


def cmd_train_lm(args) -> int:
    cfg = _lm_config(args)
    from saejax.config import check_same_run
    from saejax.train.lm import RESUMABLE_CHANGES, format_summary, train_lm

    return _run_trainer(
        args, cfg, lambda saved: check_same_run(saved, cfg, RESUMABLE_CHANGES, cfg.train.run_dir),
        train_lm, format_summary)


def _interrupted_at(run_dir: str | None) -> str:
    """The Ctrl-C line of a trainer: the step its newest checkpoint holds (where the rerun
    resumes). Leaving the trainer waited for checkpoint saves in flight."""
    step = None
    try:
        from saejax.paths import as_path

        if run_dir and (as_path(run_dir) / "checkpoints").is_dir():
            from saejax.checkpoint import Checkpointer

            step = Checkpointer(as_path(run_dir) / "checkpoints", read_only=True).latest_step()
    except Exception:  # the hint must not fail: a damaged directory says no step
        step = None
    if step is None:
        return ("interrupted before the first checkpoint; rerun the same command to resume "
                "(it starts from step 0)")
    return f"interrupted at step {step} (its last checkpoint); rerun the same command to resume"


# ---------------------------------------------------------------- config


def cmd_config(args) -> int:
    """Print the effective config (defaults <- --config <- overrides), validated, as YAML."""
    from saejax.typedconfig import to_dict

    cfg = _lm_config(args) if args.lm else _sae_config(args)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_plan(args) -> int:
    """Print what a run needs per device on --devices devices of a kind (`saejax.train.plan`):
    memory, whether it fits, step time, the activation rate it eats, checkpoint size."""
    from saejax.config import load_config
    from saejax.train.plan import format_plan, plan, plan_json

    cfg = load_config(args.config, args.overrides)
    p = plan(cfg, devices=args.devices, device_kind=args.device_kind,
             device_memory_gib=args.device_memory_gib,
             compile="none" if args.no_compile else "child",
             memory_fraction=args.memory_fraction, storage_gb_s=args.storage_gb_s,
             lm_params=args.lm_params)
    print(plan_json(p) if args.json else format_plan(p))
    return 0


def _reference_rows(root: type) -> list[tuple[str, str, str]]:
    """(field, default, meaning) of every field of a config tree, from the README's table."""
    from saejax.typedconfig import config_reference

    rows = []
    for line in config_reference(root).splitlines()[2:]:
        m = re.match(r"\| `(.+?)` \| `(.*)` \| (.*) \|$", line)
        if m:
            rows.append((m[1], m[2], m[3].replace(r"\|", "|")))
    return rows


def fields_help(root: type, command: str) -> str:
    """The field listing of `saejax <command> --help`: every field, its default and the start of
    its meaning, generated from the config dataclasses."""
    rows = _reference_rows(root)
    width = max(len(f"{name}={default}") for name, default, _ in rows)
    room = max(100 - width - 4, 20)  # one line per field, the meaning cut to fit 100 columns
    lines = ["fields (override as field=value; shown with their defaults):"]
    for name, default, meaning in rows:
        meaning = meaning if len(meaning) <= room else meaning[:room - 3].rstrip() + "..."
        lines.append(f"  {f'{name}={default}'.ljust(width)}  {meaning}")
    lm = " --lm" if command == "train-lm" else ""
    return "\n".join([*lines, "", f"Every field in full: {README_REFERENCE}.",
                      f"The effective config of a command line: saejax config --show{lm} "
                      f"[--config FILE] [overrides...]"])


def _sae_fields_help() -> str:
    from saejax.config import Config

    return fields_help(Config, "train")


def _lm_fields_help() -> str:
    from saejax.train.lm import LMTrainConfig

    return fields_help(LMTrainConfig, "train-lm")


# ---------------------------------------------------------------- data and export


def cmd_export(args) -> int:
    """One SAE, a sweep member (RUN:member or --member), or every member of a sweep into
    OUT/<member>/."""
    from saejax.export import export_run
    from saejax.paths import as_path
    from saejax.runs import members
    from saejax.sweep import split_member

    run = f"{args.run_dir}:{args.member}" if args.member else args.run_dir
    whole_sweep = split_member(run)[1] is None
    for spec in members(run):
        member = split_member(spec)[1]
        out = as_path(args.out_dir) / member if member and whole_sweep else as_path(args.out_dir)
        out = export_run(spec, out, overwrite=args.overwrite)
        print(f"wrote SAELens-format SAE to {out}")
    return 0


def cmd_tokenize(args) -> int:
    """Text -> (optionally a freshly trained BPE) -> packed token contexts on disk."""
    from saejax.text.corpus import Corpus
    from saejax.text.tokenize import tokenize

    corpus = Corpus(args.text, format=args.format, separator=args.separator,
                    text_field=args.text_field, hf_name=args.hf_dataset, split=args.split)
    ds, tok_dir = tokenize(corpus, args.out_dir, tokenizer=args.tokenizer,
                           train_bpe=args.train_bpe, tokenizer_out=args.tokenizer_out,
                           ctx_len=args.ctx_len, bos=args.bos, max_contexts=args.max_contexts,
                           overwrite=args.overwrite, progress=True)
    if tok_dir is not None:
        print(f"trained a {ds.vocab_size}-token byte-level BPE in {tok_dir}")
    print(f"wrote {len(ds)} contexts of {args.ctx_len} tokens to {args.out_dir}")
    return 0


def cmd_harvest(args) -> int:
    from saejax.data.harvest import harvest

    m = harvest(args.lm, args.tokens, args.out_dir, args.site, dtype=args.dtype,
                drop_bos=not args.keep_bos, max_contexts=args.max_contexts,
                holdout=args.holdout, contexts_per_shard=args.contexts_per_shard,
                batch_contexts=args.batch_contexts, overwrite=args.overwrite)
    print(f"stored {m['n_rows']} activation rows per site ({', '.join(m['sites'])}) of "
          f"{m['n_contexts']} contexts in {args.out_dir}")
    return 0


# ---------------------------------------------------------------- evaluation and analysis


def _contexts(args, saes: list[str], fallback: str) -> str:
    """--contexts, or contexts the SAEs were not trained on (`default_contexts`), said aloud."""
    if args.contexts is not None:
        return args.contexts
    from saejax.eval.run import default_contexts

    contexts, why = default_contexts(saes, args.tokens, fallback)
    print(f"contexts {contexts} ({why})")
    return contexts


def _expand(specs: list[str]) -> list[str]:
    """SAE arguments with each sweep run replaced by its members (RUN:member)."""
    from saejax.runs import members

    return [m for spec in specs for m in members(spec)]


def cmd_eval(args) -> int:
    from saejax.eval.run import evaluate, format_table

    args.saes = _expand(args.saes)
    results = evaluate(args.saes, args.tokens, contexts=_contexts(args, args.saes, "-2000:"),
                       batch_contexts=args.batch_contexts, lm_path=args.lm, out_dir=args.out)
    print(format_table(results))
    return 0


def _interpreter(args):
    from saejax.analysis.autointerp import (ChatClient, LLMConfig, LLMInterpreter,
                                            TokenListInterpreter)

    if args.autointerp == "offline":
        return TokenListInterpreter()
    return LLMInterpreter(ChatClient(LLMConfig(base_url=args.llm_url, model=args.llm_model,
                                               api_key_env=args.llm_key_env)))


def cmd_analyze(args) -> int:
    """Top contexts, samples, histograms, logit effects; optionally script features and
    automated interpretability of a seeded sample of alive features."""
    from saejax.analysis.features import analyze, load_analysis

    contexts = _contexts(args, [args.sae], "0:2000")
    out = analyze(args.sae, args.tokens, args.out, contexts=contexts, top_k=args.top_k,
                  n_samples=args.samples, batch_contexts=args.batch_contexts, lm_path=args.lm)
    print(f"wrote the analysis of every feature to {out}")
    if args.scripts:
        from saejax.analysis.scripts import ScriptOptions, analyse_scripts, format_report

        opts = ScriptOptions(classes=tuple(args.scripts.split(",")),
                             batch_contexts=args.batch_contexts)
        stats = analyse_scripts(args.sae, args.tokens, out / "scripts", contexts=contexts,
                                lm_path=args.lm or "", opts=opts)
        print(format_report(stats))
    if args.autointerp != "none":
        import numpy as np

        from saejax.analysis.autointerp import annotate_feature_files, summarize_scores

        alive = [r["id"] for r in load_analysis(out)["features"] if r["n_fired"] > 0]
        rng = np.random.default_rng(args.seed)
        ids = sorted(rng.choice(alive, min(args.autointerp_n, len(alive)), replace=False))
        results = annotate_feature_files(out / "features", _interpreter(args), ids=ids,
                                         seed=args.seed)
        print(summarize_scores(results))
    return 0


def _report_rows(args) -> list[dict]:
    """The report rows of the runs named (with --tokens: evaluated through the LM first)."""
    from saejax.analysis.sweep_rows import run_rows

    evaluated = None
    if args.tokens:
        from saejax.eval.run import evaluate

        saes = _expand(args.runs)
        evaluated = evaluate(saes, args.tokens, contexts=_contexts(args, saes, "-2000:"),
                             batch_contexts=args.batch_contexts, lm_path=args.lm)
    return run_rows(args.runs, evaluated)


def cmd_report(args) -> int:
    """Sweep table (CSV, markdown) and figures: frontier with Pareto members, size, density."""
    from saejax.analysis.report import write_report

    result = write_report(_report_rows(args), args.out)
    print(f"wrote {result['markdown']} and {len(result['figures'])} figures to {args.out}")
    print("Pareto (L0-FVU): " + ", ".join(result["pareto"]))
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")
    return 0


def cmd_scaling(args) -> int:
    """Power-law fits of loss against dictionary size (and tokens, compute) with intervals."""
    from saejax.analysis.scaling import scaling_report

    irreducible = {"auto": "auto", "yes": True, "no": False}[args.irreducible]
    result = scaling_report(_report_rows(args), args.out, metric_name=args.metric,
                            irreducible=irreducible, n_boot=args.bootstrap, seed=args.seed)
    print(Path(result["markdown"]).read_text())
    return 0


def cmd_browse(args) -> int:
    from saejax.browse import write_site

    index = write_site(args.analysis_dir, args.out_dir, title=args.title, progress=True)
    print(f"wrote the feature browser: open {index.resolve().as_uri()}")
    return 0


def cmd_compare(args) -> int:
    from saejax.analysis.compare import compare, format_summary

    labels = json.loads(Path(args.labels).read_text(encoding="utf-8")) if args.labels else None
    result = compare(_expand(args.saes), args.tokens, args.out, contexts=args.contexts,
                     batch_contexts=args.batch_contexts, neurons=args.neurons,
                     threshold=args.threshold, labels=labels, min_fires=args.min_fires)
    print(format_summary(result))
    return 0


# ---------------------------------------------------------------- errors


def _one_line(e: BaseException) -> str:
    """The message of an exception on one line (KeyError's without the quotes str() adds)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _kind(e: BaseException) -> tuple[str, int] | None:
    """(kind, exit code) of an exception the CLI reports as one line; None for an internal error
    (which keeps its traceback)."""
    from saejax.errors import (CheckpointError, ConfigError, NonFiniteLossError, Preempted,
                               SaejaxError, StorageError)

    # 75: EX_TEMPFAIL of sysexits.h ("try again later"), for a scheduler's requeue rule.
    table = [(Preempted, "preempted", 75),
             (NonFiniteLossError, "training stopped", 3), (CheckpointError, "checkpoint error", 4),
             (ConfigError, "config error", 2), (yaml.YAMLError, "config error", 2),
             (StorageError, "storage error", 2),
             (SaejaxError, "error", 2), (OSError, "file error", 2), (ValueError, "error", 2),
             (KeyError, "error", 2)]
    for cls, kind, code in table:
        if isinstance(e, cls):
            return kind, code
    # Best effort: a peer that died surfaces in the others as a jax runtime error.
    jax = sys.modules.get("jax")
    if (jax is not None and jax.process_count() > 1
            and type(e).__module__.startswith(("jax", "jaxlib"))):
        return ("multi-process run failed, a peer process may have stopped (rerun the same "
                "command on every host to resume)"), 1
    return None


def _report(e: BaseException) -> int | None:
    """Print `e` as one line and return the exit code, or None for an internal error."""
    kind = _kind(e)
    if kind is None:
        return None
    print(f"saejax: {kind[0]}: {_one_line(e) or type(e).__name__}", file=sys.stderr)
    return kind[1]


# ---------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when help is shown (the
    field listings import the trainers, which `saejax <command>` does not need to parse)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph texts; keeps texts of several lines (the field listings) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _config_arguments(p: argparse.ArgumentParser, example: str) -> None:
    """The arguments of a config-driven command: YAML file, --quiet, dotted overrides."""
    p.add_argument("--config", metavar="FILE",
                   help="YAML config file (nested sections, e.g. sae: {n_features: 4096}); "
                        "overrides are applied on top")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("overrides", nargs="*", metavar="field=value",
                   help=f"dotted overrides, e.g. {example} (fields listed below)")


def _add(sub, name: str, func, help: str, epilog=None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog=epilog,
                       formatter_class=_Formatter)
    p.set_defaults(func=func)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("saejax")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="saejax", description=__doc__.split("\n\n")[0],
                     epilog="saejax COMMAND --help shows a command's arguments (and, for train "
                            "and train-lm, every config field with its default).")
    parser.add_argument("--version", action="version", version=f"saejax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(sub, "train", cmd_train, "train an SAE (no arguments: the embedded synthetic "
             "default), or a sweep of SAEs in one run (--sweep); run it again to resume",
             _sae_fields_help)
    _config_arguments(p, "sae.n_features=4096")
    p.add_argument("--sweep", action="append", metavar="field=[v1,v2,...]",
                   help="train one SAE per value (repeatable: the lists are crossed), all in "
                        "one run on the same batches; members are named by the values, e.g. "
                        "l1_coefficient=2e-3,seed=1 (see saejax/sweep.py)")

    p = _add(sub, "train-lm", cmd_train_lm, "train a small LM (default: the paper's one-layer "
             "model) on a token dataset; saves run_dir/hf", _lm_fields_help)
    _config_arguments(p, "data.tokens=DIR")

    p = _add(sub, "config", cmd_config, "print the effective config of `saejax train` (or of "
             "train-lm with --lm) as YAML: defaults <- --config FILE <- overrides")
    p.add_argument("--show", action="store_true", required=True,
                   help="print the config (the only action)")
    p.add_argument("--lm", action="store_true", help="the config of train-lm instead of train")
    p.add_argument("--config", metavar="FILE", help="YAML config file, as train takes it")
    p.add_argument("overrides", nargs="*", metavar="field=value",
                   help="dotted overrides, as train takes them")

    p = _add(sub, "plan", cmd_plan, "per-device memory, fit, step time and activation rate of "
             "a `saejax train` config on N devices of a kind, without them (the step is "
             "compiled for N fake CPU devices in a child process)")
    p.add_argument("--devices", type=int, required=True, metavar="N",
                   help="number of devices; the mesh is the config's mesh.data x mesh.model")
    p.add_argument("--device-kind", default="h100", metavar="KIND",
                   help="h100 (SXM, 80 GB) or h200: measured rates, memory, interconnect")
    p.add_argument("--device-memory-gib", type=float, default=None, metavar="GIB",
                   help="memory of one device (default: the kind's)")
    p.add_argument("--memory-fraction", type=float, default=0.75, metavar="F",
                   help="fraction of the memory JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION; "
                        "JAX's default on GPUs: 0.75)")
    p.add_argument("--storage-gb-s", type=float, default=2.0, metavar="GB_S",
                   help="checkpoint write bandwidth per host, GB/s (assumed)")
    p.add_argument("--lm-params", type=float, default=0.0, metavar="N",
                   help="parameters of the LM that produces the activations (e.g. 7e9): the "
                        "FLOP/s its forward needs to keep up")
    p.add_argument("--no-compile", action="store_true",
                   help="the analytic memory model only (saejax.train.memory), no compiling")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--config", metavar="FILE", help="YAML config file, as train takes it")
    p.add_argument("overrides", nargs="*", metavar="field=value",
                   help="dotted overrides, as train takes them (e.g. mesh.model=64)")

    p = _add(sub, "export", cmd_export, "write a run's newest SAE in SAELens's on-disk format")
    p.add_argument("run_dir", help="SAE run directory (saejax train's train.run_dir); a sweep's "
                                   "exports every member to OUT_DIR/<member>/, RUN:member one")
    p.add_argument("out_dir", help="folder to write sae_weights.safetensors and cfg.json to")
    p.add_argument("--member", help="a sweep's member to export (into OUT_DIR itself)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace out_dir when it is not empty (swapped in whole when written)")

    p = _add(sub, "tokenize", cmd_tokenize, "pack text into fixed-length token contexts on "
             "disk (everything is checked before a tokenizer is trained or a file written)")
    p.add_argument("out_dir", help="token dataset directory to write")
    p.add_argument("--text", nargs="*", default=[], metavar="PATH",
                   help="text / JSON-lines files or globs")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl"],
                   help="file format; auto: .jsonl/.ndjson are JSON lines, the rest plain text")
    p.add_argument("--separator", default=None,
                   help='plain text: document separator line ("" blank lines, "%%" fortunes; '
                        'default: one document per file)')
    p.add_argument("--text-field", default="text", help="JSON lines / HF datasets: text field")
    p.add_argument("--hf-dataset", default=None, help="an HF dataset name (needs `datasets`)")
    p.add_argument("--split", default="train", help="HF dataset split")
    p.add_argument("--tokenizer", metavar="DIR_OR_ID", help="HF tokenizer directory or hub id")
    p.add_argument("--train-bpe", type=int, metavar="VOCAB_SIZE",
                   help="train a byte-level BPE of this size on the text instead")
    p.add_argument("--tokenizer-out", metavar="DIR",
                   help="where --train-bpe saves it (default OUT_DIR-tokenizer)")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per context")
    p.add_argument("--bos", default="every_context", choices=["every_context", "document", "none"],
                   help="where BOS goes: first token of every context, before every document, "
                        "or nowhere")
    p.add_argument("--max-contexts", type=int, metavar="N", help="stop after N contexts")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete dataset (and the tokenizer --train-bpe writes): the "
                        "old one stays whole until the new one is complete")

    p = _add(sub, "harvest", cmd_harvest, "store an LM's activations at hook sites over a token "
             "dataset (resumes when run again)")
    p.add_argument("lm", help="HF model directory (or hub id)")
    p.add_argument("tokens", help="token dataset directory (saejax tokenize)")
    p.add_argument("out_dir", help="activation store directory to write")
    p.add_argument("--site", action="append", required=True,
                   help="hook site, e.g. blocks.0.mlp.hook_post (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stored dtype (bfloat16 halves the disk; read back as float32)")
    p.add_argument("--keep-bos", action="store_true",
                   help="keep BOS positions (dropped by default: large-norm outliers)")
    p.add_argument("--max-contexts", type=int, metavar="N", help="harvest the first N contexts")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="never harvest the last N contexts: eval and analyze default to them")
    p.add_argument("--contexts-per-shard", type=int, default=1024,
                   help="contexts per .npy shard (each is assembled in memory)")
    p.add_argument("--batch-contexts", type=int, default=32,
                   help="contexts per LM forward call (its memory)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store harvested with other arguments, or start an "
                        "interrupted harvest over")

    held_out = ("START:STOP context ids (write --contexts=-2000: for a negative start); default: "
                "the 2,000 contexts after those the SAE's activation store harvested, else "
                "{fallback}")
    p = _add(sub, "eval", cmd_eval, "splice SAEs into their LM on held-out contexts: loss "
             "recovered, KL, L0, FVU, dead/ultralow/dense, density PNGs")
    p.add_argument("saes", nargs="+", help="SAE run directories (a sweep's: every member, or "
                                           "RUN:member) or SAELens folders")
    p.add_argument("--tokens", required=True, help="token dataset directory")
    p.add_argument("--contexts", default=None, help=held_out.format(fallback="the last 2,000"))
    p.add_argument("--batch-contexts", type=int, default=32,
                   help="contexts per LM forward call (its memory)")
    p.add_argument("--lm", help="LM directory (default: the one the SAEs record)")
    p.add_argument("--out", help="directory for eval.json and the density histograms")

    p = _add(sub, "analyze", cmd_analyze, "per-feature top contexts, samples, histograms and "
             "logit effects (an analysis directory for `saejax browse`)")
    p.add_argument("sae", help="SAE run directory (RUN:member for a sweep's) or SAELens folder")
    p.add_argument("--tokens", required=True, help="token dataset directory")
    p.add_argument("--out", required=True, help="analysis directory to write")
    p.add_argument("--contexts", default=None, help=held_out.format(fallback="0:2000"))
    p.add_argument("--top-k", type=int, default=20, help="top-activating examples per feature")
    p.add_argument("--samples", type=int, default=20, help="random firing examples per feature")
    p.add_argument("--batch-contexts", type=int, default=32,
                   help="contexts per LM forward call (its memory)")
    p.add_argument("--lm", help="LM directory (default: the one the SAE records)")
    p.add_argument("--scripts", help="script classes to rank features and neurons for, e.g. "
                                     "arabic,cyrillic,cjk (writes OUT/scripts/)")
    p.add_argument("--autointerp", default="none", choices=["none", "offline", "llm"],
                   help="explain and score features: the built-in baseline or an LLM")
    p.add_argument("--autointerp-n", type=int, default=100,
                   help="alive features to score (a seeded random sample)")
    p.add_argument("--llm-url", default="https://api.openai.com/v1",
                   help="OpenAI-compatible API root")
    p.add_argument("--llm-model", default="gpt-4o-mini", help="model name sent to the API")
    p.add_argument("--llm-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the autointerp feature sample and its examples")

    for name, func, what in (
            ("report", cmd_report, "a sweep's table (CSV, markdown) and figures: the L0-FVU "
             "(and L0-loss-recovered) frontier with Pareto members, loss against dictionary "
             "size, every member's density histogram"),
            ("scaling", cmd_scaling, "fit power laws of reconstruction loss against dictionary "
             "size (and training tokens, compute) across sweep members, with bootstrap "
             "intervals, beside the published exponents")):
        p = _add(sub, name, func, what)
        p.add_argument("runs", nargs="+", help="SAE run directories (a sweep's: all members)")
        p.add_argument("--out", required=True, help="directory to write the report to")
        p.add_argument("--tokens", help="token dataset: evaluate every member through the LM "
                                        "first (loss recovered, KL on held-out text)")
        p.add_argument("--contexts", default=None, help=held_out.format(fallback="the last 2,000"))
        p.add_argument("--batch-contexts", type=int, default=32,
                       help="contexts per LM forward call (its memory)")
        p.add_argument("--lm", help="LM directory (default: the one the runs record)")
    p.add_argument("--metric", default="fvu", help="the loss fitted: fvu (normalised MSE) or mse")
    p.add_argument("--irreducible", default="auto", choices=["auto", "yes", "no"],
                   help="fit an irreducible loss term: when the data supports it, always, never")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    p = _add(sub, "browse", cmd_browse, "write a static feature-browser site (opens from "
             "file://) for an analysis directory")
    p.add_argument("analysis_dir", help="directory written by saejax analyze")
    p.add_argument("out_dir", help="directory for the site (index.html + feature pages)")
    p.add_argument("--title", help="page title (default: the SAE's name)")

    p = _add(sub, "compare", cmd_compare, "match features between SAEs (cross-seed / cross-model "
             "universality) and build the splitting tree across sizes")
    p.add_argument("saes", nargs="+", help="2+ SAE run directories (a sweep's: every member, or "
                                           "RUN:member) or SAELens folders; 3+ in increasing "
                                           "size give the family tree")
    p.add_argument("--tokens", required=True, help="token dataset directory")
    p.add_argument("--out", required=True, help="directory for compare.json, splitting.json/png")
    p.add_argument("--contexts", default="0:2000", help="START:STOP context ids")
    p.add_argument("--batch-contexts", type=int, default=32,
                   help="contexts per LM forward call (its memory)")
    p.add_argument("--neurons", action="store_true",
                   help="also match the LMs' neurons at the site (the paper's baseline)")
    p.add_argument("--threshold", type=float, default=0.4,
                   help="masked cosine a family-tree edge needs")
    p.add_argument("--min-fires", type=int, default=10,
                   help="a feature is matched when it fires at least this often")
    p.add_argument("--labels", help="JSON {level or SAE name: {feature id: label}} for the figure")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Orbax logs a failed background save with pages of tracebacks through absl; the error that
    # reaches us says it in one line (with the last good checkpoint), so those logs stay quiet.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # The trainers have left their `with` blocks, which waited for checkpoint saves in flight.
        line = (_interrupted_at(getattr(args, "run_dir", None))
                if args.command in ("train", "train-lm") else "interrupted")
        print(f"saejax: {line}", file=sys.stderr)
        # Collect what the interrupted code left (the checkpointer's asyncio loops) now: at
        # interpreter exit their sockets may be closed first, and each prints a traceback.
        gc.collect()
        return INTERRUPTED
    except Exception as e:
        code = _report(e)
        if code is None:
            raise  # an internal error: its traceback is what a bug report needs
        return code


if __name__ == "__main__":
    sys.exit(main())
