"""`saejax <command>`: train, export, train-lm, tokenize, harvest, eval, analyze, browse, compare."""

from __future__ import annotations

import argparse
import os
import sys


def _maybe_init_distributed() -> None:
    """Join a multi-process run when SAEJAX_COORDINATOR etc. are set (see launch/local.py)."""
    if os.environ.get("SAEJAX_COORDINATOR"):
        import jax
        jax.distributed.initialize(
            coordinator_address=os.environ["SAEJAX_COORDINATOR"],
            num_processes=int(os.environ["SAEJAX_NUM_PROCESSES"]),
            process_id=int(os.environ["SAEJAX_PROCESS_ID"]),
        )


def cmd_train(args) -> int:
    from saejax.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors before any heavy import
    from saejax.train.loop import train

    _maybe_init_distributed()
    train(cfg, quiet=args.quiet)
    return 0


def cmd_export(args) -> int:
    from saejax.export import export_run

    out = export_run(args.run_dir, args.out_dir)
    print(f"wrote SAELens-format SAE to {out}")
    return 0


def cmd_train_lm(args) -> int:
    from saejax.train.lm import load_lm_train_config, train_lm

    cfg = load_lm_train_config(args.config, args.overrides)
    _maybe_init_distributed()
    train_lm(cfg, quiet=args.quiet)  # prints its summary unless quiet, as `train` does
    return 0


def cmd_tokenize(args) -> int:
    """Text -> (optionally a freshly trained BPE) -> packed token contexts on disk."""
    from saejax.config import ConfigError
    from saejax.text.corpus import Corpus
    from saejax.text.tokenizer import load_tokenizer, train_bpe
    from saejax.text.tokens import write_token_dataset

    if (args.tokenizer is None) == (args.train_bpe is None):
        raise ConfigError("give exactly one of --tokenizer DIR_OR_ID and --train-bpe VOCAB_SIZE")
    try:
        corpus = Corpus(args.text, format=args.format, separator=args.separator,
                        text_field=args.text_field, hf_name=args.hf_dataset, split=args.split)
        if args.train_bpe is not None:
            tok_dir = args.tokenizer_out or f"{args.out_dir}-tokenizer"
            tok = train_bpe(corpus, args.train_bpe, tok_dir)
            print(f"trained a {len(tok)}-token byte-level BPE in {tok_dir}")
        else:
            tok = load_tokenizer(args.tokenizer)
        ds = write_token_dataset(corpus, tok, args.out_dir, ctx_len=args.ctx_len, bos=args.bos,
                                 max_contexts=args.max_contexts, overwrite=args.overwrite,
                                 source=corpus.describe(), progress=True)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    print(f"wrote {len(ds)} contexts of {args.ctx_len} tokens to {args.out_dir}")
    return 0


def cmd_harvest(args) -> int:
    from saejax.config import ConfigError
    from saejax.data.harvest import harvest

    try:
        m = harvest(args.lm, args.tokens, args.out_dir, args.site, dtype=args.dtype,
                    drop_bos=not args.keep_bos, max_contexts=args.max_contexts,
                    contexts_per_shard=args.contexts_per_shard,
                    batch_contexts=args.batch_contexts, overwrite=args.overwrite)
    except ValueError as e:  # the store's argument and directory checks
        raise ConfigError(str(e)) from e
    print(f"stored {m['n_rows']} activation rows per site ({', '.join(m['sites'])}) in "
          f"{args.out_dir}")
    return 0


def _as_config_error(fn, *args, **kwargs):
    """Run fn; bad paths and inputs (ValueError, FileNotFoundError, ...) become ConfigError."""
    from saejax.config import ConfigError

    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        raise ConfigError(str(e)) from e


def cmd_eval(args) -> int:
    from saejax.eval.run import evaluate, format_table

    results = _as_config_error(evaluate, args.saes, args.tokens, contexts=args.contexts,
                               batch_contexts=args.batch_contexts, lm_path=args.lm,
                               out_dir=args.out)
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

    out = _as_config_error(analyze, args.sae, args.tokens, args.out, contexts=args.contexts,
                           top_k=args.top_k, n_samples=args.samples,
                           batch_contexts=args.batch_contexts, lm_path=args.lm)
    print(f"wrote the analysis of every feature to {out}")
    if args.scripts:
        from saejax.analysis.scripts import ScriptOptions, analyse_scripts, format_report

        opts = ScriptOptions(classes=tuple(args.scripts.split(",")),
                             batch_contexts=args.batch_contexts)
        stats = _as_config_error(analyse_scripts, args.sae, args.tokens, out / "scripts",
                                 contexts=args.contexts, lm_path=args.lm or "", opts=opts)
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


def cmd_browse(args) -> int:
    from saejax.browse import write_site

    index = _as_config_error(write_site, args.analysis_dir, args.out_dir, title=args.title,
                             progress=True)
    print(f"wrote the feature browser: open {index.resolve().as_uri()}")
    return 0


def cmd_compare(args) -> int:
    import json
    from pathlib import Path

    from saejax.analysis.compare import compare, format_summary

    labels = json.loads(Path(args.labels).read_text(encoding="utf-8")) if args.labels else None
    result = _as_config_error(compare, args.saes, args.tokens, args.out, contexts=args.contexts,
                              batch_contexts=args.batch_contexts, neurons=args.neurons,
                              threshold=args.threshold, labels=labels,
                              min_fires=args.min_fires)
    print(format_summary(result))
    return 0


def _config_arguments(p: argparse.ArgumentParser, example: str) -> None:
    """The arguments of a config-driven command: YAML file, --quiet, dotted overrides."""
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saejax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train an SAE (no arguments: the embedded synthetic default)")
    _config_arguments(p, "sae.n_features=4096")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("export", help="write a run's newest SAE in SAELens's on-disk format")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("train-lm", help="train a small LM (default: the paper's one-layer model) "
                                        "on a token dataset; saves run_dir/hf")
    _config_arguments(p, "data.tokens=DIR")
    p.set_defaults(func=cmd_train_lm)
    p = sub.add_parser("tokenize", help="pack text into fixed-length token contexts on disk")
    p.add_argument("out_dir")
    p.add_argument("--text", nargs="*", default=[], help="text / JSON-lines files or globs")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl"])
    p.add_argument("--separator", default=None,
                   help='plain text: document separator line ("" blank lines, "%%" fortunes)')
    p.add_argument("--text-field", default="text", help="JSON lines / HF datasets: text field")
    p.add_argument("--hf-dataset", default=None, help="an HF dataset name (needs `datasets`)")
    p.add_argument("--split", default="train")
    p.add_argument("--tokenizer", help="HF tokenizer directory or hub id")
    p.add_argument("--train-bpe", type=int, metavar="VOCAB_SIZE",
                   help="train a byte-level BPE of this size on the text instead")
    p.add_argument("--tokenizer-out", help="where --train-bpe saves it (default OUT_DIR-tokenizer)")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--bos", default="every_context", choices=["every_context", "document", "none"])
    p.add_argument("--max-contexts", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_tokenize)
    p = sub.add_parser("harvest", help="store an LM's activations at hook sites over a token "
                                       "dataset (resumes when run again)")
    p.add_argument("lm", help="HF model directory (or hub id)")
    p.add_argument("tokens", help="token dataset directory (saejax tokenize)")
    p.add_argument("out_dir")
    p.add_argument("--site", action="append", required=True,
                   help="hook site, e.g. blocks.0.mlp.hook_post (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--keep-bos", action="store_true", help="keep BOS positions")
    p.add_argument("--max-contexts", type=int)
    p.add_argument("--contexts-per-shard", type=int, default=1024)
    p.add_argument("--batch-contexts", type=int, default=32)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_harvest)
    p = sub.add_parser("eval", help="splice SAEs into their LM on held-out contexts: loss "
                                    "recovered, KL, L0, FVU, dead/ultralow/dense, density PNGs")
    p.add_argument("saes", nargs="+", help="SAE run directories or SAELens folders")
    p.add_argument("--tokens", required=True, help="token dataset directory")
    p.add_argument("--contexts", default="-2000:", help="START:STOP context ids (write --contexts=-2000: for a negative start)")
    p.add_argument("--batch-contexts", type=int, default=32)
    p.add_argument("--lm", help="LM directory (default: the one the SAEs record)")
    p.add_argument("--out", help="directory for eval.json and the density histograms")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("analyze", help="per-feature top contexts, samples, histograms and logit "
                                       "effects (an analysis directory for `saejax browse`)")
    p.add_argument("sae", help="SAE run directory or SAELens folder")
    p.add_argument("--tokens", required=True, help="token dataset directory")
    p.add_argument("--out", required=True, help="analysis directory to write")
    p.add_argument("--contexts", default="0:2000", help="START:STOP context ids")
    p.add_argument("--top-k", type=int, default=20, help="top-activating examples per feature")
    p.add_argument("--samples", type=int, default=20, help="random firing examples per feature")
    p.add_argument("--batch-contexts", type=int, default=32)
    p.add_argument("--lm", help="LM directory (default: the one the SAE records)")
    p.add_argument("--scripts", help="script classes to rank features and neurons for, e.g. "
                                     "arabic,cyrillic,cjk (writes OUT/scripts/)")
    p.add_argument("--autointerp", default="none", choices=["none", "offline", "llm"],
                   help="explain and score features: the built-in baseline or an LLM")
    p.add_argument("--autointerp-n", type=int, default=100,
                   help="alive features to score (a seeded random sample)")
    p.add_argument("--llm-url", default="https://api.openai.com/v1",
                   help="OpenAI-compatible API root")
    p.add_argument("--llm-model", default="gpt-4o-mini")
    p.add_argument("--llm-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_analyze)
    p = sub.add_parser("browse", help="write a static feature-browser site (opens from file://) "
                                      "for an analysis directory")
    p.add_argument("analysis_dir")
    p.add_argument("out_dir")
    p.add_argument("--title")
    p.set_defaults(func=cmd_browse)
    p = sub.add_parser("compare", help="match features between SAEs (cross-seed / cross-model "
                                       "universality) and build the splitting tree across sizes")
    p.add_argument("saes", nargs="+", help="2+ SAE run directories or SAELens folders; 3+ in "
                                           "increasing size give the family tree")
    p.add_argument("--tokens", required=True, help="token dataset directory")
    p.add_argument("--out", required=True, help="directory for compare.json, splitting.json/png")
    p.add_argument("--contexts", default="0:2000", help="START:STOP context ids")
    p.add_argument("--batch-contexts", type=int, default=32)
    p.add_argument("--neurons", action="store_true",
                   help="also match the LMs' neurons at the site (the paper's baseline)")
    p.add_argument("--threshold", type=float, default=0.4,
                   help="masked cosine a family-tree edge needs")
    p.add_argument("--min-fires", type=int, default=10,
                   help="a feature is matched when it fires at least this often")
    p.add_argument("--labels", help="JSON {level or SAE name: {feature id: label}} for the figure")
    p.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)

    from saejax.errors import CheckpointError, ConfigError, NonFiniteLossError
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"saejax: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"saejax: training stopped: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # damaged checkpoints with no good one to fall back to
        print(f"saejax: checkpoint error: {e}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
