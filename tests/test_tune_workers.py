"""Optuna search with several workers on one study (SQLite, PostgreSQL), Ctrl-C and SIGTERM at each moment of
a trial, and workers killed or suspended mid-trial, on tiny data against the real test server."""
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from fmnist.config import load_config
from fmnist.data import load
from fmnist.signals import HeldSignals
from fmnist.storages import open_storage
from fmnist.tracking import MLflowTracker
from fmnist.tune import Objective, PruneOnEpoch, optimize
from searching import LR, run, search_runs, states, study_exists, trial_runs, tune_command

pytestmark = pytest.mark.slow


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
    while not study_exists(storage, "parallel") or states(storage, "parallel")[TrialState.RUNNING] < 2 \
            or trial_runs("parallel") < 2:
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
        tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = ["model.widths=[16]", "train.epochs=2", "tune.n_trials=2", LR]
    cfg = load_config("ann", None, overrides)
    study = optuna.create_study(storage=open_storage(url, heartbeat=60), study_name="s", direction="maximize",
                                pruner=FailedByAnotherWorkerAtTheLastEpoch(open_storage(url, heartbeat=60)))
    data = load(tiny_data, cfg.data.val_fraction, cfg.train.seed)
    tracker = MLflowTracker("given-up")
    with tracker.run("search") as parent:
        optimize(study, Objective("ann", None, overrides, cfg, data, parent.id, tracker), cfg)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "trial 0 was failed by another worker" in capsys.readouterr().out
    runs = {r.data.tags["optuna.trial"]: r for r in MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("given-up").experiment_id], "tags.`optuna.trial` != ''")}
    assert runs["0"].info.status == "FAILED" and runs["0"].data.tags["trial_state"] == "STALE"  # not FINISHED
    assert "trial 0 was failed by another worker" in runs["0"].data.tags["fmnist.end_reason"]
    assert [runs[n].info.status for n in "12"] == ["FINISHED", "FINISHED"]


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
    while not (study_exists(storage, study) and states(storage, study)[TrialState.RUNNING] and trial_runs(study)):
        assert time.time() < deadline and worker.poll() is None, worker.stdout.read()[-3000:]
        time.sleep(0.3)
    return worker
