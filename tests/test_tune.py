"""Optuna search on tiny data against the real test server and real storages (SQLite files, PostgreSQL):
nested runs and their states, pruning, resuming, several workers, and a worker killed mid-trial."""
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import optuna
import pytest
import sqlalchemy.exc
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import ROOT
from fmnist.config import load_config
from fmnist.storages import open_storage
from fmnist.data import load
from fmnist.pipeline import NullTracker
from fmnist.signals import HeldSignals
from fmnist.tune import Objective, PruneOnEpoch, make_pruner, optimize

pytestmark = pytest.mark.slow

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
    cmd = tune_command(tiny_data, storage, "resume", 3, "train.epochs=40", "tune.pruner=none")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not _exists(storage, "resume") or states(storage, "resume")[TrialState.COMPLETE] < 1:
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stdout.read()[-3000:]
    interrupted = states(storage, "resume")
    assert interrupted[TrialState.COMPLETE] < 3 and interrupted[TrialState.RUNNING] == 0

    run(cmd, tmp_path)  # the same command again
    assert states(storage, "resume")[TrialState.COMPLETE] == 3
    parent, trials, [best] = search_runs("resume")  # one parent across both invocations
    assert parent.info.status == "FINISHED" and best.info.status == "FINISHED"
    assert sum(r.data.tags.get("trial_state") == "COMPLETE" for r in trials.values()) == 3
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials.values())  # none left RUNNING


class InterruptedOnceCreated(optuna.samplers.RandomSampler):
    """Ctrl-C in the moment after a trial is created and before its objective starts."""

    def before_trial(self, study, trial):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_ctrl_c_before_a_trials_objective_fails_that_trial_and_no_other_workers(tmp_path, kind):
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else str(tmp_path / "study.log")
    storage = open_storage(url, heartbeat=60)
    study = optuna.create_study(storage=storage, study_name="s", sampler=InterruptedOnceCreated())
    optuna.load_study(study_name="s", storage=open_storage(url, heartbeat=60)).ask()  # trial 0: another worker's
    study.enqueue_trial({})  # trial 1: queued, then taken by this worker
    cfg = load_config("ann", None, ["tune.n_trials=3"])
    for _ in range(2):  # the queued trial, then a new one (trial 2)
        with pytest.raises(KeyboardInterrupt):
            optimize(study, lambda trial, _: 1.0, cfg)
    assert [t.state for t in optuna.load_study(study_name="s", storage=open_storage(url, 60)).trials] == \
        [TrialState.RUNNING, TrialState.FAIL, TrialState.FAIL]


def test_ctrl_c_while_optuna_records_a_trial_ends_the_search_after_it(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=60)
    record = storage.set_trial_state_values

    def interrupted_while_recording(*args, **kwargs):  # the moment the CI run caught: trial 0 being told COMPLETE
        os.kill(os.getpid(), signal.SIGINT)
        return record(*args, **kwargs)

    storage.set_trial_state_values = interrupted_while_recording
    study = optuna.create_study(storage=storage, study_name="s")
    with pytest.raises(KeyboardInterrupt):
        optimize(study, lambda trial, _: trial.suggest_float("x", 0, 1), load_config("ann", None, ["tune.n_trials=3"]))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]  # recorded whole, and no second trial begun


def test_ctrl_c_stops_parallel_trials_at_their_next_epoch(tmp_path, capfd):
    # tune.n_jobs=2: the trials run in worker threads, where Python delivers no signal
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=60),
                                study_name="s")

    def objective(trial, interrupt):
        for epoch in range(1, 201):  # 10 s of epochs unless something stops them
            time.sleep(0.05)
            interrupt.on_epoch_end(epoch, {})
        return 1.0

    ctrl_c = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    ctrl_c.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            optimize(study, objective, load_config("ann", None, ["tune.n_trials=4", "tune.n_jobs=2"]))
    finally:
        ctrl_c.cancel()  # should optimize return early, no Ctrl-C may reach the rest of the session
    assert time.monotonic() - start < 5  # not after the running trials' last epochs
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    # a second Ctrl-C would stop nothing sooner (the main thread waits for the trials' threads): no promise of it
    assert "fmnist: Ctrl-C: stopping each running trial at its epoch's end\n" in capfd.readouterr().err


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_only_one_of_two_workers_starts_a_queued_trial(tmp_path, backend, request):
    # Two threads of one search (tune.n_jobs=2), or two workers, both find the queued defaults and start them at
    # once: each reads the trial's state (WAITING), and only then writes RUNNING. Both trained trial 0, and the
    # second to finish crashed the search telling a finished trial (seen in the parallel SIGTERM test).
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    storage = open_storage(url, heartbeat=60)
    study = optuna.create_study(storage=storage, study_name=f"queued-{backend}")
    study.enqueue_trial({"x": 0.5})
    trial_id = study.trials[0]._trial_id
    both_read = threading.Barrier(2, timeout=2)
    check = storage.check_trial_is_updatable

    def check_then_wait_for_the_other(*args):  # between reading the state and writing RUNNING
        check(*args)
        try:
            both_read.wait()
        except threading.BrokenBarrierError:  # the other one is kept from reading until this one has written
            pass

    storage.check_trial_is_updatable = check_then_wait_for_the_other
    started = []
    workers = [threading.Thread(target=lambda: started.append(storage.set_trial_state_values(trial_id,
                                                                                           TrialState.RUNNING)))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(started) == [False, True]


def test_sigterm_to_a_parallel_search_ends_its_trial_runs_killed(tracking_env, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = tune_command(tiny_data, storage, "parallel", 4, "train.epochs=2000", "tune.pruner=none", "tune.n_jobs=2")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not _exists(storage, "parallel") or states(storage, "parallel")[TrialState.RUNNING] < 2 \
            or _trial_runs("parallel") < 2:
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.3)
    time.sleep(1)  # both in their epochs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stdout.read()[-3000:]
    assert states(storage, "parallel") == {TrialState.FAIL: 2}
    _, trials, best = search_runs("parallel")
    assert [r.info.status for r in trials.values()] == ["KILLED", "KILLED"] and not best


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study_without_losing_or_repeating_trials(tracking_env, tiny_data, tmp_path, backend,
                                                                        request):
    storage = (f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite"
               else request.getfixturevalue("postgres_url"))
    study = f"workers-{backend}"
    cmd = tune_command(tiny_data, storage, study, 4, "train.epochs=15", "train.threads=1", "tune.pruner=none")
    workers = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]  # started together: both race to create the tables and the study
    for worker in workers:
        output = worker.communicate(timeout=400)[0]
        assert worker.returncode == 0, output[-3000:]

    trials = optuna.load_study(study_name=study, storage=storage).trials
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 4 <= len(finished) <= 5  # two trials can start at the very same moment; none is lost
    assert len({t.number for t in trials}) == len(trials) and all(t.state != TrialState.RUNNING for t in trials)
    parent, runs, best = search_runs(study)
    assert sorted(runs) == sorted(t.number for t in trials)  # every trial exactly one run, under one parent
    assert len({r.data.tags["optuna.worker"] for r in runs.values()}) == 2  # both workers did trials
    assert len(best) == 1  # retrained once, by one of the two


def test_killed_worker_trial_is_failed_and_retried(tracking_env, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    hangs = worker_inside_trial_0(tiny_data, storage, "killed", tmp_path)
    hangs.send_signal(signal.SIGKILL)
    hangs.wait(timeout=30)
    time.sleep(2.5)  # heartbeat 1 s: stale after 2 s of silence

    run(tune_command(tiny_data, storage, "killed", 2, "train.epochs=2"), tmp_path)  # another worker
    trials = optuna.load_study(study_name="killed", storage=storage).trials
    assert Counter(t.state for t in trials) == {TrialState.FAIL: 1, TrialState.COMPLETE: 2}
    [failed] = [t for t in trials if t.state == TrialState.FAIL]
    [retried] = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retried.state == TrialState.COMPLETE and retried.params == failed.params
    parent, runs, best = search_runs("killed")
    assert runs[failed.number].info.status == "FAILED" and runs[failed.number].data.tags["trial_state"] == "STALE"
    assert parent.info.status == "FINISHED" and len(best) == 1


def test_a_worker_stopped_past_the_grace_period_gives_up_its_failed_trial_and_goes_on(tracking_env, tiny_data,
                                                                                      tmp_path):
    """A suspended laptop: SIGSTOP a worker mid-trial until another worker has failed and retried its trial, then
    SIGCONT it. It gives the trial up at its next epoch's end (its run stays FAILED) and finishes without a crash."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sleeper = worker_inside_trial_0(tiny_data, storage, "stopped", tmp_path)
    stop_outside_a_write(sleeper, tmp_path / "optuna.db")
    try:
        time.sleep(2.5)  # heartbeat 1 s: stale after 2 s of silence
        run(tune_command(tiny_data, storage, "stopped", 2, "train.epochs=2"), tmp_path)  # another worker
    finally:
        sleeper.send_signal(signal.SIGCONT)
    out, _ = sleeper.communicate(timeout=120)
    assert sleeper.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "trial 0 was failed by another worker" in out, out[-3000:]
    trials = optuna.load_study(study_name="stopped", storage=storage).trials
    assert Counter(t.state for t in trials) == {TrialState.FAIL: 1, TrialState.COMPLETE: 2}
    parent, runs, best = search_runs("stopped")
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["trial_state"] == "STALE"
    assert parent.info.status == "FINISHED" and len(best) == 1


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


def test_ctrl_c_during_a_trials_report_is_delivered_after_the_write(tmp_path):
    """A Ctrl-C in the middle of Optuna's database write could leave its session unusable, so that telling the
    trial failed (`Should not reach`, seen once in the suite): the epoch callback's writes hold it until done."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=60))
    trial = study.ask()
    written = []

    def report_with_ctrl_c_inside(value, step):
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler at the next bytecode: inside the write
        written.append(step)

    with HeldSignals() as signals, signals.delivered():
        trial.report = report_with_ctrl_c_inside
        with pytest.raises(KeyboardInterrupt):
            PruneOnEpoch(trial, 2, signals).on_epoch_end(1, {"val_accuracy": 0.5})
    assert written == [5]  # the write finished; the interrupt came after it


class FailedByAnotherWorkerAtTheLastEpoch(optuna.pruners.NopPruner):
    """Another worker fails trial 0 (as after a stop past the grace period) right after its last epoch's report."""

    def __init__(self, other: optuna.storages.BaseStorage):
        self.other = other

    def prune(self, study, trial) -> bool:
        if trial.number == 0 and trial.last_step == 10:  # a trial's last epoch reports step 10 (tenths)
            self.other.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return False


def test_a_trial_failed_by_another_worker_after_its_last_epoch_is_given_up_and_the_search_goes_on(
        tiny_data, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = ["model.widths=[16]", "train.epochs=2", "tune.n_trials=2", LR]
    cfg = load_config("ann", None, overrides)
    study = optuna.create_study(storage=open_storage(url, heartbeat=60), study_name="s", direction="maximize",
                                pruner=FailedByAnotherWorkerAtTheLastEpoch(open_storage(url, heartbeat=60)))
    data = load(tiny_data, cfg.data.val_fraction, cfg.train.seed)
    optimize(study, Objective("ann", None, overrides, cfg, data, "untracked", NullTracker(tmp_path)), cfg)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "trial 0 was failed by another worker" in capsys.readouterr().out


def stop_outside_a_write(worker: subprocess.Popen, database) -> None:
    """SIGSTOP the worker, but not in the middle of an SQLite write: the other worker would wait on its lock and
    fail with `database is locked` (a suspend can land there too; it is SQLite's limit, not the one tested)."""
    for _ in range(100):
        worker.send_signal(signal.SIGSTOP)
        connection = sqlite3.connect(database, timeout=0.2)
        try:
            connection.execute("BEGIN IMMEDIATE")  # the write lock: free unless the worker stopped holding it
            connection.rollback()
            return
        except sqlite3.OperationalError:
            worker.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        finally:
            connection.close()
    pytest.fail("the worker held the SQLite write lock at each of 100 stops")


def worker_inside_trial_0(tiny_data, storage: str, study: str, cwd) -> subprocess.Popen:
    """A worker of a 2-trial search whose first trial (endless epochs) is running and has its MLflow run."""
    worker = subprocess.Popen(tune_command(tiny_data, storage, study, 2, "train.epochs=100000"), cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (_exists(storage, study) and states(storage, study)[TrialState.RUNNING] and _trial_runs(study)):
        assert time.time() < deadline and worker.poll() is None, worker.stdout.read()[-3000:]
        time.sleep(0.3)
    return worker


def _exists(storage: str, study: str) -> bool:
    try:
        return os.path.exists(storage.removeprefix("sqlite:///")) and study in optuna.get_all_study_names(storage)
    except sqlalchemy.exc.SQLAlchemyError:  # the worker is creating the tables this very moment: not yet
        return False


def _trial_runs(study: str) -> int:
    experiment = MlflowClient().get_experiment_by_name(f"tune-{study}")
    return 0 if experiment is None else sum(
        "optuna.trial" in r.data.tags for r in MlflowClient().search_runs([experiment.experiment_id]))


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
