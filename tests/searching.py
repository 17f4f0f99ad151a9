"""What the search tests share: the `fmnist tune` command on tiny data (a one-layer MLP, 3 epochs, heartbeats
every second, the learning rate searched), and reading back its runs and its trials' states."""
import os
import subprocess
import sys
from collections import Counter

import optuna
import sqlalchemy.exc
from mlflow import MlflowClient

LR = "tune.space={train.lr: {low: 1.0e-7, high: 0.01, log: true}}"


def tune_command(tiny_data, storage: str, study: str, n_trials: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "fmnist", "tune", "--arch", "ann", "--data-dir", str(tiny_data), "--experiment",
            f"tune-{study}", "--storage", storage, "--study-name", study, "--n-trials", str(n_trials),
            "model.widths=[16]", "train.epochs=3", "tune.heartbeat=1", LR, *overrides]


def run(cmd, cwd, timeout=300):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def search_runs(study: str):
    """(the parent run, the trial runs by trial number, the retrained best runs) of one search."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"tune-{study}")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("fmnist.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = Counter(r.data.tags["optuna.trial"] for r in children if "optuna.trial" in r.data.tags)
    assert all(n == 1 for n in trials.values()), f"a trial logged more than one run: {trials}"
    by_number = {int(r.data.tags["optuna.trial"]): r for r in children if "optuna.trial" in r.data.tags}
    best = [r for r in children if "optuna.trial" not in r.data.tags]
    return parent, by_number, best


def states(storage: str, study: str) -> Counter:
    if storage.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(storage))
    return Counter(t.state for t in optuna.load_study(study_name=study, storage=storage).trials)


def study_exists(storage: str, study: str) -> bool:
    try:
        return os.path.exists(storage.removeprefix("sqlite:///")) and study in optuna.get_all_study_names(storage)
    except sqlalchemy.exc.SQLAlchemyError:  # the worker is creating the tables this very moment: not yet
        return False


def trial_runs(study: str) -> int:
    experiment = MlflowClient().get_experiment_by_name(f"tune-{study}")
    return 0 if experiment is None else sum(
        "optuna.trial" in r.data.tags for r in MlflowClient().search_runs([experiment.experiment_id]))
