"""Which RUNNING runs are stale, decided from their liveness tags, and which staged files are orphaned, on a real
SQLite store in this process."""
import json
import os
import socket
import subprocess
import sys
import time

from mlflow import MlflowClient

from fmnist.tracking import MLflowTracker, store
from fmnist.tracking.sender import WRITER, outbox_dir


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no such process now


def test_stale_runs_are_ended_failed_with_the_reason_and_live_ones_are_left(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    client = MlflowClient(uri)
    experiment = client.create_experiment("liveness", artifact_location=str(tmp_path / "artifacts"))
    now, here = time.time(), socket.gethostname()

    def running(host: str, pid: int, age: float, interval: float = 30, beat: bool = True) -> str:
        tags = {store.HOST_TAG: host, store.PID_TAG: str(pid), store.INTERVAL_TAG: str(interval)}
        if beat:
            tags[store.BEAT_TAG] = f"{now - age:.0f}"
        return client.create_run(experiment, tags=tags).info.run_id

    dead_here = running(here, dead_pid(), age=5)  # its process is gone: stale at once
    silent_elsewhere = running("another-host", 123, age=200)  # > 3 heartbeats: stale
    live_here = running(here, os.getpid(), age=500)  # our own process: alive, whatever its last beat
    recent_elsewhere = running("another-host", 123, age=30)  # within 3 heartbeats
    not_ours = running(here, dead_pid(), age=5, beat=False)  # no fmnist heartbeat: left alone

    with MLflowTracker("liveness").run("the next run"):  # a top-level run repairs its experiment first
        pass
    status = {r: client.get_run(r).info.status for r in (dead_here, silent_elsewhere, live_here, recent_elsewhere,
                                                         not_ours)}
    assert status == {dead_here: "FAILED", silent_elsewhere: "FAILED", live_here: "RUNNING",
                      recent_elsewhere: "RUNNING", not_ours: "RUNNING"}
    assert "is gone" in client.get_run(dead_here).data.tags[store.REASON_TAG]
    assert "no heartbeat for 2" in client.get_run(silent_elsewhere).data.tags[store.REASON_TAG]


def test_files_staged_by_a_process_that_died_are_removed_and_the_rest_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    here = socket.gethostname()

    def stage(name: str, writer: dict | None, entry: bool = False):
        folder = outbox_dir() / name
        (folder / "0-model").mkdir(parents=True)  # a staged copy of the model
        if writer is not None:
            (folder / WRITER).write_text(json.dumps(writer))
        if entry:  # kept by a run that ended while the store was away: fmnist sync sends it
            (folder / "ops.json").write_text("{}")
        return folder

    dead = stage("run1-a", {"host": here, "pid": dead_pid()})  # SIGKILLed mid-run
    live = stage("run2-b", {"host": here, "pid": os.getpid()})
    elsewhere = stage("run3-c", {"host": "another-host", "pid": 123})  # its process table is not ours to read
    entry = stage("run4-d", {"host": here, "pid": dead_pid()}, entry=True)
    unnamed = stage("run5-e", None)  # staged before writers were named: cannot be told
    with MLflowTracker("stages").run("the next run"):  # a top-level run repairs the outbox too
        pass
    assert [f.exists() for f in (dead, live, elsewhere, entry, unnamed)] == [False, True, True, True, True]
