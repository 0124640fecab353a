"""`saejax <command>`: train, export."""

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
    from saejax.export_run import export_run

    out = export_run(args.run_dir, args.out_dir)
    print(f"wrote SAELens-format SAE to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saejax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train an SAE (no arguments: the embedded synthetic default)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sae.n_features=4096")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("export", help="write a run's newest SAE in SAELens's on-disk format")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)

    from saejax.config import ConfigError
    from saejax.train.metrics import NonFiniteLossError
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"saejax: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"saejax: training stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
