"""Optuna search over the `tune.space` of experiments/<arch>.yaml; each trial is a nested MLflow run.

With storages.py, the only module that imports optuna. A study lives in an Optuna storage (default: the SQLite file
optuna.db), so re-running the same command resumes it, and any number of workers, on any number of machines, can
share it through one storage URL (postgresql://...). Running trials send heartbeats; a trial whose worker died is
failed and queued again. `tune.n_trials` is the total the study should reach, whoever runs the trials. The first
trial of a new study is the experiment's default configuration, so the search can only improve on it. When the study
is done, its best configuration is retrained once, evaluated on the test set and registered.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import random
import socket
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from fmnist import data as fdata
from fmnist.config import Config, load_config, parse_overrides
from fmnist.errors import ConfigError, GivenUp, Pruned, SearchError
from fmnist.pipeline import Run, Tracker, run_experiment, with_teacher
from fmnist.signals import HeldSignals
from fmnist.space import as_overrides, inside, label, suggest
from fmnist.storages import open_storage, redacted, retry
from fmnist.tracking import store

optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial prints its own epochs
# fail_stale_trials and the matplotlib plots are marked experimental; they are the documented way all the same
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
TENTHS = 10  # a trial reports at each tenth of its schedule (PruneOnEpoch)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)  # toward n_trials; FAIL is retried


def tune(arch: str, config_path: str | None, overrides: list[str], tracker: Tracker) -> str | None:
    """Run (or join, or resume) the search; returns the retrained best run's id, None if another worker does it."""
    cfg = load_config(arch, config_path, overrides)
    fixed = sorted({key for key, _, _ in parse_overrides(overrides)} & set(cfg.tune.space))
    if fixed:  # given on the command line: the user's value holds, the search leaves it alone
        cfg.tune.space = {k: v for k, v in cfg.tune.space.items() if k not in fixed}
        print(f"fmnist tune: {', '.join(f'{k}={cfg.flat()[k]}' for k in fixed)} given, so fixed and not searched")
    if not cfg.tune.space:
        raise ConfigError(f"tune.space of {arch} is empty: declare the search space in experiments/{arch}.yaml")
    # Bad data or a bad teacher: no study, no run. The teacher's answers are computed here, once for all trials.
    data = with_teacher(fdata.load(cfg.data.data_dir, cfg.data.val_fraction, cfg.train.seed), cfg)
    storage = open_storage(cfg.tune.storage, cfg.tune.heartbeat, on_stale=retry_stale_trial)
    study, created = open_study(cfg, cfg.tune.study_name or f"{tracker.experiment}-{arch}", storage)
    parent_id = None if created else parent_run_of(study)
    if parent_id and (why := store.unusable(parent_id)):
        print(f"fmnist tune: study {study.study_name}'s parent {why}; the search goes on in a new parent run")
        parent_id = None
    launcher = store.nest_launcher_run(parent_id) if parent_id and os.environ.get("MLFLOW_RUN_ID") else None
    with tracker.run(f"search-{arch}", resume=parent_id) as parent:
        if study.user_attrs.get("mlflow_run_id") != parent.id:
            study.set_user_attr("mlflow_run_id", parent.id)
            parent.set_tags({"fmnist.kind": "search", "optuna.study": study.study_name,
                             "optuna.storage": redacted(cfg.tune.storage)})
        objective = Objective(arch, config_path, list(overrides), cfg, data, parent.id, tracker)
        before = len(study.trials)
        optimize(study, objective, cfg)
        best = _best(study)
        if launcher:  # what this resume added, on the run `mlflow run` made for it
            store.log_metrics_to(launcher, {"trials_added": len(study.trials) - before} |
                                 ({"best_val_accuracy": best["value"]} if best else {}))
        log_search(parent, study, cfg.tune.space, best)
        if best is None:
            raise SearchError(f"study {study.study_name}: no trial completed, nothing to retrain")
        summary = f"best trial {best['trial']}: validation accuracy {best['value']:.4f} with {best['params']}"
        key = f"retrained_trial_{best['trial']}"  # a later, better trial (a longer re-run) is retrained again
        if not cfg.tune.retrain or not claim_retrain(study, key):
            print(summary + (f"; retrained by {study.user_attrs[key]}" if cfg.tune.retrain else ""))
            return None
        winner = load_config(arch, config_path, [*overrides, *as_overrides(best["params"]),
                                                 f"tracking.run_name={arch}-best"])
        try:
            run_id = run_experiment(winner, tracker, data, parent=parent.id).run_id
        except BaseException:
            study.set_user_attr(key, "")  # unclaimed: the next run of the command retrains
            raise
        study.set_user_attr(key, f"run {run_id}")
        print(f"{summary}; retrained and tested as run {run_id}")
        return run_id


def optimize(study: optuna.Study, objective, cfg: Config) -> None:
    """Trials until the study holds n_trials or tune.timeout has passed. Ctrl-C and SIGTERM reach only a trial's
    objective, where Optuna fails the trial and the pipeline ends its run KILLED. Elsewhere Optuna is writing a
    trial's state or creating the next trial, and an exception there leaves a trial RUNNING or trips an assertion
    inside Optuna (both seen in tests); there the signal is held, the search stops after the trial in hand, and
    the signal is raised then. With tune.n_jobs > 1 the trials run in threads that no signal reaches: each stops
    at its next epoch's end. A trial another worker failed while this one was stopped cannot be told, and Optuna
    raises for it; the search then goes on."""
    deadline = time.monotonic() + cfg.tune.timeout if cfg.tune.timeout else math.inf
    given_up: list[int] = []
    threads = cfg.tune.n_jobs > 1  # the main thread only waits for them: a second Ctrl-C stops nothing sooner
    with HeldSignals("stopping each running trial at its epoch's end" if threads else HeldSignals.NOTE) as signals:
        def deliverable(trial: optuna.Trial) -> float:
            try:
                with signals.delivered():
                    return objective(trial, signals)  # with tune.n_jobs > 1 a trial checks for a signal each epoch
            except GivenUp as e:
                print(f"fmnist tune: {e}", flush=True)
                given_up.append(trial.number)
                return math.nan  # returned, not raised: Optuna would log the exception with its traceback

        def done(s: optuna.Study = study) -> bool:
            return enough(s, cfg.tune.n_trials) or bool(signals.held)

        while not done() and (left := deadline - time.monotonic()) > 0:
            try:
                study.optimize(deliverable, n_jobs=cfg.tune.n_jobs, timeout=left if left < math.inf else None,
                               catch=(ConfigError,), callbacks=[lambda s, trial: done(s) and s.stop()])
                return
            except (ValueError, AssertionError):  # "Cannot tell a FAIL trial", or Optuna's assertion after it
                if not given_up:
                    raise
                given_up.clear()


def log_search(parent: Run, study: optuna.Study, space: dict, best: dict | None) -> None:
    """The study so far on the parent run: every trial as CSV, the space, the best trial, Optuna's plots."""
    import matplotlib.pyplot as plt

    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trials.to_csv(folder / "trials.csv", index=False)
        (folder / "space.yaml").write_text(yaml.safe_dump(space))
        if best:
            (folder / "best.yaml").write_text(yaml.safe_dump(best))
        for name, figure in _figures(study).items():
            figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
        parent.log_artifacts(folder, "search")
    counts = dict(trials["state"].value_counts()) if len(trials) else {}
    parent.log_metrics({f"trials_{state.lower()}": int(n) for state, n in counts.items()})
    if best:
        parent.log_metrics({"best_val_accuracy": best["value"], "best_trial": best["trial"]})
        parent.set_tags({f"best.{k}": str(v) for k, v in best["params"].items()})


def claim_retrain(study: optuna.Study, key: str) -> bool:
    """Whether this worker retrains the winner. Workers that finish together may both claim it; the last write
    wins, and the pause lets every claimant see it."""
    if study.user_attrs.get(key):  # another worker, or an earlier run of this command
        return False
    me = f"worker {socket.gethostname()}:{os.getpid()}"
    study.set_user_attr(key, me)
    time.sleep(1)
    return study.user_attrs.get(key) == me


class Objective:
    """One trial: the base configuration plus the sampled values, trained as a nested run, pruned at tenths of its
    schedule."""

    def __init__(self, arch: str, config_path, overrides: list[str], cfg: Config, data, parent_run_id: str,
                 tracker: Tracker):
        self.arch, self.config_path, self.overrides, self.cfg = arch, config_path, overrides, cfg
        self.data, self.parent_run_id, self.tracker = data, parent_run_id, tracker

    def __call__(self, trial: optuna.Trial, interrupt: HeldSignals) -> float:
        sampled = as_overrides({key: suggest(trial, key, spec) for key, spec in self.cfg.tune.space.items()})
        cfg = load_config(self.arch, self.config_path, [*self.overrides, *sampled,
                                                        f"tracking.run_name=trial-{trial.number}"])
        print(f"trial {trial.number}: {trial.params}", flush=True)
        try:
            outcome = run_experiment(cfg, self.tracker, self.data, parent=self.parent_run_id, trial=True,
                                     callbacks=[PruneOnEpoch(trial, cfg.train.epochs, interrupt), interrupt],
                                     tags={"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number),
                                           "optuna.worker": f"{socket.gethostname()}:{os.getpid()}"})
        except Pruned:
            raise optuna.TrialPruned() from None
        if trial.number in failed_trials(trial.study):  # stopped after its last epoch's report
            # Its run, FINISHED by now, ends FAILED as a trial's given up sooner does; reopened as the nested run it
            # is, so without the top-level run's repair of the experiment
            with self.tracker.run(resume=outcome.run_id, parent=self.parent_run_id) as run:
                run.set_tags({"trial_state": "STALE"})
                raise given_up(trial.number)
        return outcome.history.best_val_accuracy


class PruneOnEpoch:
    """Training callback: validation accuracy to Optuna, and stop when the pruner says so. Trials are compared at
    the same share of their schedules: step k is the first epoch past k tenths of it (10: the last). The one-cycle
    learning rate follows the planned epochs, so at epoch 1 a 6-epoch CNN led an 11- and a 16-epoch one by 1.2 to
    1.6 points of validation accuracy, though it ends below them: per-epoch steps pruned long schedules early."""

    def __init__(self, trial: optuna.Trial, epochs: int, signals: HeldSignals | None = None):
        self.trial, self.epochs, self.step = trial, epochs, -1
        # A Ctrl-C inside Optuna's write can leave its session unusable, and telling the trial then fails
        self.writing = signals.postponed if signals else contextlib.nullcontext

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        step = TENTHS * epoch // self.epochs
        first_of_its_tenth = step != self.step  # over 10 epochs, some share a tenth: the first reports it
        try:
            with self.writing():
                # Every epoch, not only at reports: the write is also what finds a trial another worker has failed
                # (an endless or long schedule may not report again for many epochs)
                self.trial.set_user_attr("epochs_run", epoch)
                if first_of_its_tenth:
                    self.trial.report(metrics["val_accuracy"], step)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise given_up(self.trial.number) from None
        self.step = step
        if first_of_its_tenth and self.trial.should_prune():
            raise Pruned(f"trial {self.trial.number} pruned after epoch {epoch} of {self.epochs}")


def open_study(cfg: Config, name: str, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; returns it and whether this worker created it. Safe when
    several workers start at once: the storage lets exactly one create it."""
    where = f"tune.storage={redacted(cfg.tune.storage)}"

    def create(seed: int, load: bool) -> optuna.Study:
        return optuna.create_study(
            storage=storage, study_name=name, direction="maximize", load_if_exists=load,
            # constant_liar: parallel workers do not all sample next to the same promising point
            sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True), pruner=make_pruner(cfg.tune.pruner))

    try:
        study = retry(lambda: create(cfg.tune.seed, load=False), where)
    except optuna.exceptions.DuplicatedStudyError:
        # resumed or joined: a seed of its own, or it would replay the samples already tried
        return retry(lambda: create(cfg.tune.seed + 1 + random.randrange(10**6), load=True), where), False
    defaults = {k: label(v) for k, v in cfg.flat().items() if k in cfg.tune.space and inside(v, cfg.tune.space[k])}
    study.enqueue_trial(defaults)
    return study, True


def parent_run_of(study: optuna.Study, wait: float = 10) -> str | None:
    """The search's MLflow run, which the study's creator records; a worker that joins a new study waits for it."""
    deadline = time.monotonic() + wait
    while "mlflow_run_id" not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    return study.user_attrs.get("mlflow_run_id")  # None: made outside fmnist, or its creator died; make one


def retry_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker stopped sending heartbeats (killed, crashed): its run ends FAILED, the trial reruns."""
    if "mlflow_run_id" in study.user_attrs:
        store.end_stale_trial_run(study.user_attrs["mlflow_run_id"], study.study_name, trial.number)
    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, trial)


def given_up(number: int) -> GivenUp:
    return GivenUp(f"trial {number} was failed by another worker while this one sent no heartbeat (stopped or "
                   "suspended past the grace period); its retry runs there, so this worker gives it up and goes on")


def failed_trials(study: optuna.Study) -> set[int]:
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}


def enough(study: optuna.Study, n_trials: int) -> bool:
    """Whether the study holds its n_trials (finished or running) with none queued; stale trials are failed and
    queued again first. As many failed trials as requested ones also end the search: the space is likely broken."""
    fail_stale_trials(study)
    states = collections.Counter(t.state for t in study.get_trials(deepcopy=False))
    return (states[TrialState.WAITING] == 0 and sum(states[s] for s in COUNTED) >= n_trials
            or states[TrialState.FAIL] >= n_trials)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":  # after 2 complete trials, stop a trial below their median at the same tenth (from 1/10)
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":  # resource: tenths of a trial's schedule
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=TENTHS, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _best(study: optuna.Study) -> dict | None:
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None
    return {"trial": best.number, "value": best.value, "params": best.params}


def _figures(study: optuna.Study) -> dict[str, object]:
    """Optuna's matplotlib plots; importance needs two complete trials and more than one parameter."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    figures = {}
    for name, plot in (("optimization_history", plots.plot_optimization_history),
                       ("param_importances", plots.plot_param_importances),
                       ("parallel_coordinate", plots.plot_parallel_coordinate),
                       ("intermediate_values", plots.plot_intermediate_values)):
        try:
            figures[name] = plot(study).figure
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            print(f"note: no {name} plot ({e})")
    return figures
