"""Command line: `fmnist train --arch cnn [train.epochs=3 ...]`, `tune`, `study`, `compare`,
`predict --model models:/fmnist-cnn@champion FILES...`, `server`, `doctor`, `sync`.

Bad input of any kind is one line on stderr and exit status 2; Ctrl-C exits 130 and SIGTERM 143, with the run
ended KILLED.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fmnist.errors import ConfigError, UserError, one_line


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every run in flight is ended KILLED, then exit status 143."""


def _terminate(signum, frame):
    raise Terminated("SIGTERM")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmnist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train, evaluate and log one architecture to MLflow",
                           description="Values resolve as: defaults, then the experiment file, then overrides. "
                                       "Example: fmnist train --arch cnn train.epochs=3")
    train.add_argument("--dry-run", action="store_true", help="train and evaluate, log nothing (no MLflow)")
    tune = sub.add_parser("tune", help="Optuna search over experiments/<arch>.yaml's tune.space, trials as nested "
                                       "runs; the best configuration is then retrained, tested and registered",
                          description="Re-running the same command resumes the study; workers given the same "
                                      "--storage and --study-name share it.")
    for p in (train, tune):  # `fmnist train --n-trials N` is `fmnist tune` (MLproject's -P n_trials=N)
        p.add_argument("--arch", required=True, help="architecture: ann, cnn or transfer (an unknown name lists the "
                                                      "registered ones)")
        p.add_argument("--config", help="experiment file (default: experiments/<arch>.yaml)")
        p.add_argument("--budget", default="", help="a named variant: NAME reads experiments/<arch>-NAME.yaml; 'long' "
                                                    "(cnn, transfer) is for more time or a GPU, 'distilled' (ann) "
                                                    "learns from the registered CNN")
        p.add_argument("--data-dir", help="directory with the four Fashion-MNIST IDX files (same as data.data_dir)")
        p.add_argument("--experiment", help="MLflow experiment name (same as tracking.experiment)")
        p.add_argument("--n-trials", type=int, help="trials the study should hold in all (tune.n_trials; "
                                                    "0 = no search)")
        p.add_argument("--timeout", type=float, help="seconds this worker searches at most (tune.timeout)")
        p.add_argument("--storage", help="Optuna storage: sqlite:///optuna.db (default), postgresql://..., or a "
                                         "journal file *.log (tune.storage)")
        p.add_argument("--study-name", help="default: <experiment>-<arch> (tune.study_name)")
        p.add_argument("--n-jobs", type=int, help="trials in parallel threads of this process (tune.n_jobs)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="e.g. train.epochs=3 train.lr=0.001 model.widths=[64,128]; an empty value means "
                            "'not given'")
    study = sub.add_parser("study", help="train ann, cnn and transfer as nested runs of one parent run, then "
                                         "compare exactly those (MLproject's main entry point)")
    study.add_argument("--archs", default="ann,cnn,transfer", help="comma-separated (default: ann,cnn,transfer)")
    study.add_argument("--seeds", default="", help="train every architecture once per seed: a count (3: seeds 0, 1, "
                                                   "2, from train.seed) or a list (0,4,7); default: one seed")
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
    doctor = sub.add_parser("doctor", help="end FAILED the runs whose process died (still RUNNING), list the runs "
                                           "kept locally while the tracking server was away")
    doctor.add_argument("--experiment", help="only this experiment (default: all)")
    sync = sub.add_parser("sync", help="send runs kept locally (the outbox) to their tracking store")
    sync.add_argument("entries", nargs="*", metavar="DIR", help="outbox entries (default: all of them)")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line. Overrides (section.key=value) may also come after an option: argparse alone stops
    collecting a positional list at the first option and calls the rest unrecognised."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(arg.startswith("-") for arg in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"fmnist {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print("fmnist: terminated (SIGTERM); runs in flight were ended KILLED", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("fmnist: interrupted; runs in flight were ended KILLED", file=sys.stderr)
        return 130


def run_overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "experiment", None):
        overrides.append(f"tracking.experiment={args.experiment}")
    for option in ("n_trials", "timeout", "storage", "study_name", "n_jobs"):
        if getattr(args, option, None) not in (None, ""):
            overrides.append(f"tune.{option}={getattr(args, option)}")
    return overrides


def tracker_for(cfg):
    from fmnist.tracking import MLflowTracker
    from fmnist.tracking.store import current_experiment

    return MLflowTracker(current_experiment(cfg.tracking.experiment), cfg.tracking.heartbeat,
                         cfg.tracking.outage_wait)


def experiment_file(args) -> str | None:
    """--config, or the file of --budget NAME (experiments/<arch>-NAME.yaml), or None: experiments/<arch>.yaml."""
    from fmnist.config import EXPERIMENTS_DIR

    if not args.budget:
        return args.config
    if args.config:
        raise ConfigError("--budget and --config: expected one of the two")
    path = EXPERIMENTS_DIR / f"{args.arch}-{args.budget}.yaml"
    if not path.is_file():
        budgets = sorted(f.stem.split("-", 1)[1] for f in EXPERIMENTS_DIR.glob(f"{args.arch}-*.yaml"))
        raise ConfigError(f"--budget {args.budget}: no {path.name}; expected one of {', '.join(budgets) or 'none'}")
    return str(path)


def train_command(args) -> int:
    from fmnist.config import load_config
    from fmnist.pipeline import NullTracker, run_experiment

    args.config = experiment_file(args)
    overrides = run_overrides(args)
    cfg = load_config(args.arch, args.config, overrides)
    if args.command == "tune" or cfg.tune.n_trials:
        if not cfg.tune.n_trials:
            raise ConfigError("--n-trials (tune.n_trials) is 0: expected the number of trials the study should hold")
        from fmnist.tune import tune

        tune(args.arch, args.config, overrides, tracker_for(cfg))
        return 0
    if args.dry_run:
        tracker = NullTracker()
        run_experiment(cfg, tracker)
        print(f"not tracked (--dry-run): the evaluation and the model are in {tracker.folder}")
    else:
        run_experiment(cfg, tracker_for(cfg))
    return 0


def study_command(args) -> int:
    from fmnist.config import load_config
    from fmnist.study import parse_seeds, run_study

    overrides = run_overrides(args)
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    base = load_config(archs[0], None, overrides)
    seeds = parse_seeds(args.seeds, base.train.seed)
    markdown, parent = run_study(archs, seeds, overrides, tracker_for(base), Path(args.out))
    print(f"{markdown}\nstudy run {parent}; report in {args.out}")
    return 0


def compare_command(args) -> int:
    from fmnist.compare import compare
    from fmnist.tracking import MLflowTracker
    from fmnist.tracking.store import current_experiment

    tracker = MLflowTracker(args.experiment or current_experiment("fmnist"))
    markdown, _, run_id = compare(tracker.experiment, tracker, args.filter, args.select, Path(args.out))
    print(markdown + f"\nwritten to {args.out}; logged as run {run_id}")
    return 0


def predict_command(args) -> int:
    from fmnist.predict import read_images
    from fmnist.tracking.pyfunc import classify

    images, names = read_images(args.files)
    table = classify(args.model, images)
    width = max(map(len, names))
    for name, label, p in zip(names, table["class"], table["probability"]):
        print(f"{name:<{width}}  {label:<12} {p:.3f}")
    return 0


def server_command(args) -> int:
    from fmnist.tracking.server import serve

    serve(args.host, args.port, Path(args.root), args.workers)
    return 0


def doctor_command(args) -> int:
    from fmnist.tracking import store
    from fmnist.tracking.sender import discard_orphaned_stages, outbox_dir

    store.configure_http()
    store.check_reachable()
    store.open_store()
    ended = store.end_stale_runs_in(args.experiment)
    for run_id, reason in ended:
        print(f"ended run {run_id} FAILED: {reason}")
    for stage in discard_orphaned_stages():
        print(f"removed {stage}: files staged by a process that died before it could keep its record")
    kept = sorted(p.parent for p in outbox_dir().glob("*/ops.json"))
    for entry in kept:
        print(f"kept locally, not yet sent: {entry} (send it with: fmnist sync {entry})")
    print(f"{len(ended)} stale run{'s' * (len(ended) != 1)} ended, {len(kept)} outbox entr"
          f"{'ies' if len(kept) != 1 else 'y'} waiting")
    return 0


def sync_command(args) -> int:
    from fmnist.tracking.sender import outbox_dir, sync

    entries = [Path(e) for e in args.entries] or sorted(p.parent for p in outbox_dir().glob("*/ops.json"))
    for entry in entries:
        run_id, operations, requests = sync(entry)
        print(f"sent run {run_id} from {entry}: {operations} operations in {requests} requests")
    if not entries:
        print(f"nothing to send: {outbox_dir()} holds no runs")
    return 0


COMMANDS = {"train": train_command, "tune": train_command, "study": study_command, "compare": compare_command,
            "predict": predict_command, "server": server_command, "doctor": doctor_command, "sync": sync_command}


if __name__ == "__main__":
    sys.exit(main())
