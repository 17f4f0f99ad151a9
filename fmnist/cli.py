"""Command line: `fmnist train --arch cnn [train.epochs=3 model.dropout=0.2 ...]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmnist.config import ConfigError, load_config
from fmnist.data import DataError
from fmnist.models.backbones import WeightsError


def build_parser() -> argparse.ArgumentParser:
    from fmnist.models import available

    parser = argparse.ArgumentParser(prog="fmnist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train, evaluate and log one architecture to MLflow",
                           description="Values resolve as: dataclass defaults, then the experiment file, then "
                                       "overrides. Example: fmnist train --arch cnn train.epochs=3")
    train.add_argument("--arch", required=True, help=f"architecture: {', '.join(available())}")
    train.add_argument("--config", help="experiment file (default: experiments/<arch>.yaml)")
    train.add_argument("--data-dir", help="directory with the four Fashion-MNIST IDX files (same as data.data_dir)")
    train.add_argument("--experiment", help="MLflow experiment name (same as tracking.experiment)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="e.g. train.epochs=3 train.lr=0.001 model.widths=[64,128]")
    comp = sub.add_parser("compare", help="compare the best run of each architecture (chosen by validation)")
    comp.add_argument("--experiment", default="fmnist", help="MLflow experiment holding the runs (default: fmnist)")
    comp.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.study = 'v2'\"")
    comp.add_argument("--select", default="best_val_accuracy",
                      help="validation metric that picks each architecture's best run (default: best_val_accuracy)")
    comp.add_argument("--out", default="outputs/comparison", help="directory for the report files")
    srv = sub.add_parser("server", help="start an MLflow tracking server (sqlite store, artifacts served by it)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=5000)
    srv.add_argument("--root", default="mlflow-server", help="directory for mlflow.db and mlartifacts/")
    srv.add_argument("--workers", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return compare_command(args)
    if args.command == "server":
        from fmnist.tracking import serve

        serve(args.host, args.port, Path(args.root), args.workers)
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.experiment:
        overrides.append(f"tracking.experiment={args.experiment}")
    try:
        cfg = load_config(args.arch, args.config, overrides)
        from fmnist.experiment import run_experiment

        run_experiment(cfg)
    except (ConfigError, DataError, WeightsError) as e:
        print(f"fmnist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmnist: interrupted; the run was ended as KILLED", file=sys.stderr)
        return 130
    return 0


def compare_command(args) -> int:
    from fmnist.compare import compare

    try:
        markdown, run_id = compare(args.experiment, args.filter, args.select, Path(args.out))
    except (LookupError, ValueError) as e:
        print(f"fmnist compare: error: {e}", file=sys.stderr)
        return 2
    print(markdown + f"\nwritten to {args.out}; logged as run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
