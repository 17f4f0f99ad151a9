"""Command line: `fmnist train --arch cnn [train.epochs=3 model.dropout=0.2 ...]`."""
from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
