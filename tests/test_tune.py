"""Optuna search on tiny data against the real test server and real storages (an SQLite file, a journal file):
nested runs and their states, pruning, retraining the best, resuming, and a study that outlives its parent run.
Several workers, signals and killed workers: tests/test_tune_workers.py."""
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import ROOT
from fmnist.tune import PruneOnEpoch, make_pruner
from searching import LR, run, search_runs, states, study_exists, tune_command

pytestmark = pytest.mark.slow


def test_search_logs_nested_trials_prunes_and_retrains_the_best(tracking_env, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="states", direction="maximize")
    for lr in (0.003, 0.005, 1e-7):  # the last learns nothing: below the median at its first epoch
        study.enqueue_trial({"train.lr": lr})
    out = run(tune_command(tiny_data, storage, "states", 3), tmp_path)

    assert states(storage, "states") == {TrialState.COMPLETE: 2, TrialState.PRUNED: 1}
    parent, trials, [best] = search_runs("states")
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna.study"] == "states"
    assert parent.data.metrics["trials_complete"] == 2 and parent.data.metrics["trials_pruned"] == 1
    assert [trials[n].data.tags["trial_state"] for n in range(3)] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert all(r.info.status == "FINISHED" for r in trials.values())
    client = MlflowClient()
    pruned_epochs = client.get_metric_history(trials[2].info.run_id, "val_accuracy")
    assert len(pruned_epochs) < 3  # stopped before its last epoch
    assert trials[0].data.params["train.lr"] == "0.003" and "test_accuracy" not in trials[0].data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/trials.csv", "search/optimization_history.png", "search/parallel_coordinate.png",
            "search/best.yaml", "search/space.yaml"} <= artifacts
    # The winner is retrained once, tested and registered, as a run of its own under the search.
    winner = float(parent.data.tags["best.train.lr"])
    assert float(best.data.params["train.lr"]) == winner and "test_accuracy" in best.data.metrics
    assert client.search_model_versions(f"run_id = '{best.info.run_id}'")
    assert f"retrained and tested as run {best.info.run_id}" in out.stdout


def test_interrupted_search_resumes_to_the_requested_total(tracking_env, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = tune_command(tiny_data, storage, "resume", 3, "train.epochs=20", "tune.pruner=none", "tune.retrain=false")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not study_exists(storage, "resume") or states(storage, "resume")[TrialState.COMPLETE] < 1:
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stdout.read()[-3000:]
    interrupted = states(storage, "resume")
    assert interrupted[TrialState.COMPLETE] < 3 and interrupted[TrialState.RUNNING] == 0

    run(cmd, tmp_path)  # the same command again
    assert states(storage, "resume")[TrialState.COMPLETE] == 3
    parent, trials, best = search_runs("resume")  # one parent across both invocations
    assert parent.info.status == "FINISHED" and best == []  # retraining: the first test
    assert sum(r.data.tags.get("trial_state") == "COMPLETE" for r in trials.values()) == 3
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials.values())  # none left RUNNING


@pytest.mark.parametrize("epochs, steps", [(6, [1, 3, 5, 6, 8, 10]), (11, list(range(11))),
                                           (16, list(range(11))), (3, [3, 6, 10])])
def test_trials_report_at_the_same_tenths_of_their_schedules(epochs, steps):
    trial = optuna.create_study().ask()
    prune = PruneOnEpoch(trial, epochs)
    for epoch in range(1, epochs + 1):
        prune.on_epoch_end(epoch, {"val_accuracy": epoch / epochs})
    frozen = trial.study.trials[0]
    assert sorted(frozen.intermediate_values) == steps and frozen.user_attrs["epochs_run"] == epochs
    # a tenth that several epochs share holds the first one's value (tenth 1 of 16 epochs: epoch 2 of 2 and 3)
    assert frozen.intermediate_values[1 if epochs > 3 else 3] == (2 if epochs > 10 else 1) / epochs


def test_a_short_schedules_early_lead_does_not_prune_a_long_one():
    """The CNN's validation accuracy (defaults, seed 0) measured at the first epochs of 6-, 11- and 16-epoch
    schedules. Per epoch, the 11-epoch trial trails the other two at epoch 1 and was pruned there, though the
    longer schedule ends higher; at equal tenths of the schedules it leads them."""
    study = optuna.create_study(direction="maximize", pruner=make_pruner("median"))
    for epochs, curve in {6: [0.8682, 0.8970, 0.9092], 16: [0.8567, 0.8803, 0.9012]}.items():
        trial = study.ask()  # the two complete trials the median pruner waits for
        prune = PruneOnEpoch(trial, epochs)
        for epoch, value in enumerate(curve, 1):
            prune.on_epoch_end(epoch, {"val_accuracy": value})
        study.tell(trial, max(curve))
    prune = PruneOnEpoch(study.ask(), 11)
    for epoch, value in enumerate([0.8525, 0.8892], 1):
        prune.on_epoch_end(epoch, {"val_accuracy": value})  # Pruned, were it pruned


def test_transfer_trials_reuse_the_cached_activations_and_a_journal_file_holds_the_study(tracking_env, tiny_data,
                                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    storage = str(tmp_path / "study.log")  # a journal file instead of a database
    run([sys.executable, "-m", "fmnist", "tune", "--arch", "transfer", "--data-dir", str(tiny_data), "--experiment",
         "tune-transfer", "--storage", storage, "--study-name", "transfer", "--n-trials", "2", "train.epochs=1",
         "model.resolution=32", "model.unfrozen_blocks=1", "tune.retrain=false", LR], tmp_path)
    assert states(storage, "transfer") == {TrialState.COMPLETE: 2}
    _, trials, best = search_runs("transfer")
    assert [trials[n].data.tags["feature_cache"] for n in (0, 1)] == ["miss", "hit"] and best == []



def test_a_study_that_outlives_its_tracking_store_or_parent_run_goes_on_in_a_new_parent(tracking_env, tiny_data,
                                                                                       tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run(tune_command(tiny_data, storage, "outlives", 1, "tune.retrain=false"), tmp_path)
    first_parent, _, _ = search_runs("outlives")

    MlflowClient().delete_run(first_parent.info.run_id)  # the parent deleted in this store
    out = run(tune_command(tiny_data, storage, "outlives", 2, "tune.retrain=false"), tmp_path)
    assert f"run {first_parent.info.run_id} is deleted" in out.stdout and "goes on in a new parent run" in out.stdout

    fresh = f"sqlite:///{tmp_path / 'fresh-store.db'}"  # the same study, another tracking store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh)
    out = run(tune_command(tiny_data, storage, "outlives", 3, "tune.retrain=false"), tmp_path)
    assert "does not exist in" in out.stdout and "goes on in a new parent run" in out.stdout
    client = MlflowClient(fresh)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(r.info.status == "FINISHED" for r in runs)  # no empty FAILED runs
    [parent] = [r for r in runs if r.data.tags.get("fmnist.kind") == "search"]
    assert optuna.load_study(study_name="outlives", storage=storage).user_attrs["mlflow_run_id"] == \
        parent.info.run_id


def test_resuming_through_mlflow_run_leaves_no_empty_run_and_a_given_searched_value_is_fixed(tracking_env,
                                                                                             tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = ["mlflow", "run", str(ROOT), "-e", "ann", "--env-manager", "local", "--experiment-name", "tune-mlrun",
           "-P", f"data_dir={tiny_data}", "-P", f"storage={storage}", "-P", "study_name=mlrun", "-P", "epochs=2",
           "-P", "widths=[16]"]
    for n_trials in (1, 2):
        out = run([*cmd, "-P", f"n_trials={n_trials}"], tmp_path, timeout=400)
        assert "train.epochs=2 given, so fixed and not searched" in out.stdout
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tune-mlrun").experiment_id])
    parents = [r for r in runs if r.data.tags.get("fmnist.kind") == "search"]
    assert len(parents) == 1  # both invocations' trials under one parent
    empty = [r for r in runs if not r.data.metrics and "mlflow.parentRunId" not in r.data.tags
             and r.data.tags.get("fmnist.kind") != "search"]
    assert empty == []
    trials = [r for r in runs if "optuna.trial" in r.data.tags]
    assert len(trials) == 2 and all(r.data.params["train.epochs"] == "2" for r in trials)
