"""Search speed on real data: trials per minute with and without pruning, the share of epochs pruning saved, and
one worker against several sharing one study.

Each configuration runs `fmnist tune tune.retrain=false` on a fresh study and a fresh MLflow
store in a temporary directory, one after the other on the same machine:

    python benchmarks/tuning.py --arch ann --trials 20                       # median pruner vs none, one worker
    python benchmarks/tuning.py --arch ann --trials 20 --pruners median --workers 1 2 --storage postgresql://...
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from fmnist.config import load_config
from fmnist.errors import reported


def run_search(arch: str, trials: int, pruner: str, workers: int, storage: str | None, threads: int,
               extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        storage = storage or f"sqlite:///{Path(tmp) / 'optuna.db'}"
        study = f"bench-{arch}-{pruner}-{workers}w-{int(time.time())}"
        env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}"}
        cmd = [sys.executable, "-m", "fmnist", "tune", "--arch", arch, "--n-trials", str(trials), "--storage", storage,
               "--study-name", study, "--experiment", study, f"tune.pruner={pruner}", f"train.threads={threads}",
               "tune.retrain=false", *extra]
        # The first worker creates the study; the others join a second later, as on a shared cluster.
        start = time.perf_counter()
        procs = []
        for i in range(workers):
            procs.append(subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))
            time.sleep(1 if i == 0 and workers > 1 else 0)
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode == 2:  # bad input: the worker's own one-line report, passed on as it is
                print((err.strip().splitlines() or ["fmnist tune: bad input (exit status 2)"])[-1], file=sys.stderr)
                raise SystemExit(2)
            if proc.returncode:
                raise SystemExit(f"fmnist tune failed:\n{err[-3000:]}")
        wall = time.perf_counter() - start
        done = optuna.load_study(study_name=study, storage=storage).trials
    finished = [t for t in done if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    given = [x for x in extra if "=" in x and not x.startswith("-")]  # section.key=value, not --flag=value
    base_epochs = load_config(arch, overrides=given).train.epochs  # train.epochs=N fixes the epochs of every trial
    epochs_run = sum(t.user_attrs.get("epochs_run", len(t.intermediate_values)) for t in finished)
    epochs_full = sum(int(t.params.get("train.epochs", base_epochs)) for t in finished)
    search_seconds = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return {"pruner": pruner, "workers": workers, "trials": len(finished),
            "pruned": sum(t.state == TrialState.PRUNED for t in finished),
            "best": max(t.value for t in finished if t.state == TrialState.COMPLETE),
            "search_min": search_seconds / 60, "wall_min": wall / 60,
            "trials_per_min": len(finished) / (search_seconds / 60), "epochs_saved": 1 - epochs_run / epochs_full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ann")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pruners", nargs="+", default=["median", "none"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1])
    parser.add_argument("--storage", help="shared storage URL (default: a fresh SQLite file per search)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="torch threads split between workers")
    parser.add_argument("overrides", nargs="*", help="passed to fmnist tune, e.g. tune.timeout=1800")
    args = parser.parse_args()
    rows = []
    for workers in args.workers:
        for pruner in args.pruners:
            row = run_search(args.arch, args.trials, pruner, workers, args.storage,
                             max(1, args.cores // workers), ["--timeout", "0", *args.overrides])
            rows.append(row)
            print(row, flush=True)
    print("\n| arch | workers | pruner | trials | pruned | best val acc | search min | wall min | trials/min | epochs saved |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {args.arch} | {r['workers']} | {r['pruner']} | {r['trials']} | {r['pruned']} | {r['best']:.4f} | "
              f"{r['search_min']:.1f} | {r['wall_min']:.1f} | {r['trials_per_min']:.2f} | {r['epochs_saved']:.0%} |")


if __name__ == "__main__":
    with reported("tuning.py"):
        main()
