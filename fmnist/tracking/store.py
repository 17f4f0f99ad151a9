"""The tracking store itself: is it there, which experiment, which runs, and runs whose process died.

- An unreachable server is reported within seconds, before any data is loaded.
- Experiments are created race-safe: several processes on a new SQLite file create its tables one at a time (a
  file lock; MLflow's migration is not safe to run concurrently), and a creation race is settled by reading the
  winner's experiment. Runs are then started with that explicit experiment id.
- A RUNNING run whose process is gone (on this host: its pid is dead; elsewhere: no heartbeat for 3 intervals) is
  ended FAILED, with the reason in the tag `fmnist.end_reason`, by later runs and `fmnist doctor`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import requests
from mlflow.exceptions import MlflowException

from fmnist.data import file_lock
from fmnist.errors import ConfigError, TrackingError, one_line

HOST_TAG, PID_TAG, BEAT_TAG, INTERVAL_TAG, REASON_TAG = ("fmnist.host", "fmnist.pid", "fmnist.heartbeat",
                                                         "fmnist.heartbeat_interval", "fmnist.end_reason")


def configure_http() -> None:
    """Short HTTP retries: the sender retries outages itself and says so, instead of MLflow's silent minutes
    of backoff per request. No progress bars or INFO chatter in a run's output. A user's own settings win."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_reachable() -> None:
    """Fail within seconds when the tracking server does not answer (before data loading and training)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as e:
        reason = type(e).__name__ if not str(e) else one_line(e)[:200]
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer ({reason}); start "
                            "it (fmnist server) or point MLFLOW_TRACKING_URI at one that runs") from None


def store_lock():
    """A lock held while the store's tables and experiments are created: a file lock for a SQLite store."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return file_lock(uri.removeprefix("sqlite:///"))


def open_store() -> None:
    """Open the tracking store once in this process, holding the lock: opening a new SQLite store creates its
    tables (MLflow's schema migration), which several processes must not do at once. MLflow keeps the opened
    store for the rest of the process."""
    with store_lock():
        mlflow.MlflowClient()


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created if missing, safe against other processes doing the same."""
    with store_lock():
        client = mlflow.MlflowClient()
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return client.create_experiment(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = client.get_experiment_by_name(name)
        if found.lifecycle_stage == "deleted":
            raise TrackingError(f"--experiment {name}: the experiment is deleted in {mlflow.get_tracking_uri()}; "
                                f"restore it (mlflow experiments restore --experiment-id {found.experiment_id}) "
                                "or choose another name")
        return found.experiment_id


def current_experiment(default: str) -> str:
    """The experiment of the run `mlflow run` created for this process (MLFLOW_RUN_ID), else `default`."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return default
    client = mlflow.MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def unusable(run_id: str) -> str | None:
    """Why a run cannot be resumed in this store (missing, deleted), or None if it can."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return f"run {run_id} does not exist in {mlflow.get_tracking_uri()}"
    if run.info.lifecycle_stage == "deleted":
        return f"run {run_id} is deleted in {mlflow.get_tracking_uri()}"
    return None


def liveness_tags(interval: float) -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), BEAT_TAG: f"{time.time():.0f}",
            INTERVAL_TAG: f"{interval:g}"}


def stale_reason(tags: dict[str, str], now: float) -> str | None:
    """Why a RUNNING run's process must be gone, or None. Runs without fmnist's heartbeat are left alone."""
    if BEAT_TAG not in tags:
        return None
    age = now - float(tags[BEAT_TAG])
    host, pid = tags.get(HOST_TAG, "?"), tags.get(PID_TAG, "")
    if host == socket.gethostname() and pid.isdigit():  # this host's process table knows: no guessing from age
        alive = psutil.pid_exists(int(pid))  # (a live process's heartbeats may be queued behind an outage)
        return None if alive else f"its process {pid} on {host} is gone (last heartbeat {age:.0f} s before this check)"
    if age > 3 * float(tags.get(INTERVAL_TAG, 30)):
        return f"no heartbeat for {age:.0f} s from process {pid} on {host}"
    return None


def end_stale_runs(experiment_ids: list[str] | None = None) -> list[tuple[str, str]]:
    """End FAILED every RUNNING run whose process is gone (a search trial's is also tagged trial_state=STALE);
    returns (run id, reason) for each."""
    client = mlflow.MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    ended, now = [], time.time()
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=1000):
        reason = stale_reason(run.data.tags, now)
        if reason:
            if "optuna.trial" in run.data.tags:
                client.set_tag(run.info.run_id, "trial_state", "STALE")
            client.set_tag(run.info.run_id, REASON_TAG, reason)
            client.set_terminated(run.info.run_id, "FAILED")
            ended.append((run.info.run_id, reason))
    return ended


def end_stale_runs_in(experiment: str | None) -> list[tuple[str, str]]:
    """`fmnist doctor`: end the stale runs of one experiment (by name), or of all."""
    if experiment is None:
        return end_stale_runs()
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"--experiment {experiment}: no such experiment at {mlflow.get_tracking_uri()}")
    return end_stale_runs([found.experiment_id])


def end_now(run_id: str, status: str, reason: str | None) -> None:
    """One quick attempt (5 s, no retries) to end a run; if the store does not answer, the run's outbox entry or
    `fmnist doctor` ends it later."""
    quick = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        client = mlflow.MlflowClient()
        if reason:
            client.set_tag(run_id, REASON_TAG, reason)
        client.set_terminated(run_id, status)
    except Exception:
        pass
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def end_stale_trial_run(parent_run_id: str, study: str, number: int) -> None:
    """The run of search trial `number` whose worker died (Optuna's heartbeat noticed) ends FAILED."""
    client = mlflow.MlflowClient()
    if unusable(parent_run_id):
        return
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`optuna.study` = "
                                                   f"'{study}' and tags.`optuna.trial` = '{number}'"):
        client.set_tag(run.info.run_id, "trial_state", "STALE")
        client.set_tag(run.info.run_id, REASON_TAG, "the search worker running this trial stopped sending heartbeats")
        client.set_terminated(run.info.run_id, "FAILED")


def nest_launcher_run(search_run_id: str) -> str:
    """`mlflow run` made a run for this process, but a resumed search logs to its own parent run: the launcher's
    run becomes a `resume` child of that parent, which records what this invocation added, so resumes leave no
    empty runs (`mlflow run` ends it as usual)."""
    run_id = os.environ.pop("MLFLOW_RUN_ID")
    mlflow.MlflowClient().log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in {
        "mlflow.parentRunId": search_run_id, "fmnist.kind": "search-resume", "mlflow.runName": "resume"}.items()])
    return run_id


def log_metrics_to(run_id: str, metrics: dict[str, float]) -> None:
    mlflow.MlflowClient().log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                                     for k, v in metrics.items()])


def finished_training_runs(experiment: str, filter_string: str = "") -> tuple[str, pd.DataFrame]:
    """(the experiment's id, its FINISHED runs as a DataFrame from MLflow's search API)."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"--experiment {experiment}: no such MLflow experiment at {mlflow.get_tracking_uri()}")
    query = " and ".join(f for f in ("attributes.status = 'FINISHED'", filter_string) if f)
    try:
        runs = mlflow.search_runs([found.experiment_id], filter_string=query, output_format="pandas")
    except MlflowException as e:
        raise ConfigError(f"--filter {filter_string!r}: MLflow refused it ({e.message})") from None
    return found.experiment_id, runs


def download(run_id: str, artifact_path: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst)))
    except (MlflowException, OSError) as e:
        raise TrackingError(f"run {run_id}: cannot read its artifact {artifact_path} "
                          f"({one_line(e)[:200]})") from None
