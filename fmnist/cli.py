"""Command line: `fmnist train --arch cnn [train.epochs=3 ...]`, `fmnist study`, `fmnist compare`,
`fmnist predict --model models:/fmnist-cnn@champion FILES...`, `fmnist server`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmnist.config import ConfigError, load_config
from fmnist.data import DataError
from fmnist.models.backbones import WeightsError
from fmnist.train import SearchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmnist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train, evaluate and log one architecture to MLflow",
                           description="Values resolve as: dataclass defaults, then the experiment file, then "
                                       "overrides. Example: fmnist train --arch cnn train.epochs=3")
    add_run_options(train, "e.g. train.epochs=3 train.lr=0.001 model.widths=[64,128]")
    tune = sub.add_parser("tune", help="Optuna search over experiments/<arch>.yaml's tune.space, trials as nested "
                                       "runs; the best configuration is then retrained, tested and registered",
                          description="Re-running the same command resumes the study; workers given the same "
                                      "--storage and --study-name share it.")
    add_run_options(tune, "the base configuration the search starts from")
    for p in (train, tune):  # `fmnist train --n-trials N` is `fmnist tune` (MLproject's -P n_trials=N)
        p.add_argument("--n-trials", type=int, help="trials the study should hold in all (tune.n_trials; "
                                                    "0 = no search)")
        p.add_argument("--timeout", type=float, help="seconds this worker searches at most (tune.timeout)")
        p.add_argument("--storage", help="Optuna storage: sqlite:///optuna.db (default), postgresql://..., or a "
                                         "journal file *.log (tune.storage)")
        p.add_argument("--study-name", help="default: <experiment>-<arch> (tune.study_name)")
        p.add_argument("--n-jobs", type=int, help="trials in parallel threads of this process (tune.n_jobs)")
    study = sub.add_parser("study", help="train ann, cnn and transfer as nested runs of one parent run, then "
                                         "compare exactly those (MLproject's main entry point)")
    study.add_argument("--archs", default="ann,cnn,transfer", help="comma-separated (default: ann,cnn,transfer)")
    study.add_argument("--epochs", type=int, default=0, help="epochs for every architecture (0: each one's default)")
    study.add_argument("--data-dir", help="directory with the four Fashion-MNIST IDX files (same as data.data_dir)")
    study.add_argument("--experiment", default="fmnist", help="MLflow experiment (default: fmnist; under `mlflow "
                                                                "run`, the one it chose)")
    study.add_argument("--out", default="outputs/comparison", help="directory for the comparison report")
    study.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="applied to every architecture, e.g. train.seed=1 data.data_dir=DIR")
    comp = sub.add_parser("compare", help="compare the best run of each architecture (chosen by validation)")
    comp.add_argument("--experiment", help="MLflow experiment holding the runs (default: the one `mlflow run` "
                                           "chose, else fmnist)")
    comp.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.study = 'v2'\"")
    comp.add_argument("--select", default="best_val_accuracy",
                      help="validation metric that picks each architecture's best run (default: best_val_accuracy)")
    comp.add_argument("--out", default="outputs/comparison", help="directory for the report files")
    pred = sub.add_parser("predict", help="classify PNG/JPEG files (28x28) or .npy batches with a logged model")
    pred.add_argument("--model", required=True, help="model URI, e.g. models:/fmnist-cnn@champion or runs:/ID/model")
    pred.add_argument("files", nargs="+", metavar="FILE", help=".png, .jpg/.jpeg (one 28x28 image) or .npy "
                                                                "(uint8, (N, 28, 28) or (28, 28))")
    srv = sub.add_parser("server", help="start an MLflow tracking server (sqlite store, artifacts served by it)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=5000)
    srv.add_argument("--root", default="mlflow-server", help="directory for mlflow.db and mlartifacts/")
    srv.add_argument("--workers", type=int, default=1)
    return parser


def add_run_options(parser: argparse.ArgumentParser, overrides_help: str) -> None:
    from fmnist.models import available

    parser.add_argument("--arch", required=True, help=f"architecture: {', '.join(available())}")
    parser.add_argument("--config", help="experiment file (default: experiments/<arch>.yaml)")
    parser.add_argument("--data-dir", help="directory with the four Fashion-MNIST IDX files (same as data.data_dir)")
    parser.add_argument("--experiment", help="MLflow experiment name (same as tracking.experiment)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=overrides_help)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return compare_command(args)
    if args.command == "predict":
        return predict_command(args)
    if args.command == "server":
        from fmnist.tracking import serve

        serve(args.host, args.port, Path(args.root), args.workers)
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.experiment:
        overrides.append(f"tracking.experiment={args.experiment}")
    for option in ("n_trials", "timeout", "storage", "study_name", "n_jobs"):
        if getattr(args, option, None) not in (None, ""):
            overrides.append(f"tune.{option}={getattr(args, option)}")
    try:
        if args.command == "study":
            from fmnist.experiment import run_study

            archs = [a.strip() for a in args.archs.split(",") if a.strip()]
            if args.epochs:
                overrides.append(f"train.epochs={args.epochs}")
            markdown, parent = run_study(archs, overrides, args.experiment, Path(args.out))
            print(f"{markdown}\nstudy run {parent}; report in {args.out}")
            return 0
        cfg = load_config(args.arch, args.config, overrides)
        if args.command == "tune" or cfg.tune.n_trials:
            if not cfg.tune.n_trials:
                raise ConfigError("--n-trials (tune.n_trials) is 0: expected the number of trials the study should hold")
            from fmnist.tune import tune

            tune(args.arch, args.config, overrides)
            return 0
        from fmnist.experiment import run_experiment

        run_experiment(cfg)
    except (ConfigError, DataError, WeightsError, LookupError, SearchError) as e:
        print(f"fmnist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmnist: interrupted; the run was ended as KILLED", file=sys.stderr)
        return 130
    return 0


def compare_command(args) -> int:
    from fmnist.compare import compare
    from fmnist.tracking import current_experiment

    try:
        markdown, run_id = compare(args.experiment or current_experiment("fmnist"), args.filter, args.select,
                                   Path(args.out))
    except (LookupError, ValueError) as e:
        print(f"fmnist compare: error: {e}", file=sys.stderr)
        return 2
    print(markdown + f"\nwritten to {args.out}; logged as run {run_id}")
    return 0


def predict_command(args) -> int:
    from fmnist.predict import InputError, read_images
    from fmnist.tracking import load_classifier

    try:
        images, names = read_images(args.files)
        table = load_classifier(args.model).predict(images)
    except (InputError, LookupError) as e:
        print(f"fmnist predict: error: {e}", file=sys.stderr)
        return 2
    width = max(map(len, names))
    for name, label, p in zip(names, table["class"], table["probability"]):
        print(f"{name:<{width}}  {label:<12} {p:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
