"""The tracking record survives real faults: a tracking server killed and started again (a short outage, one that
outlasts the run, the backlog it leaves), no server at all, a training process killed with SIGKILL, Ctrl-C while
the server creates a run or while the record is sent, and runs started together on a new and an existing SQLite
store."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from conftest import free_port, start_server, stop_server

pytestmark = pytest.mark.slow


def train(tiny_data, experiment: str, *overrides: str, env=None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fmnist", "train", "--arch", "ann", "--data-dir", str(tiny_data),
                             "--experiment", experiment, "model.widths=[16]", "train.batch_size=32", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def wait_for_epoch(proc: subprocess.Popen, epoch: int, lines: list[str]) -> None:
    """Read the trainer's stdout until it prints `epoch N/`."""
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"epoch {epoch:>3}/"):
            return
    pytest.fail("training ended before epoch %d: %s" % (epoch, "".join(lines)[-2000:] + proc.stderr.read()[-2000:]))


def only_run(client: MlflowClient, experiment: str):
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


@pytest.fixture(scope="module")
def killable_server(tmp_path_factory):
    """A server the tests of this module kill and start again: (root, port, the running process in a list)."""
    root, port = tmp_path_factory.mktemp("killable-server"), free_port()
    proc = [start_server(root, port)]
    yield root, port, proc
    stop_server(proc[0])


@pytest.fixture
def own_server(killable_server, tmp_path, monkeypatch):
    """That server, running (started again if a test left it down), as this test's tracking store."""
    root, port, proc = killable_server
    if proc[0].poll() is not None:
        proc[0] = start_server(root, port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the outbox lives there
    yield killable_server


def test_a_short_outage_loses_nothing_and_is_not_counted_as_training(own_server, tiny_data):
    root, port, server = own_server
    proc, out = train(tiny_data, "outage", "train.epochs=60"), []
    wait_for_epoch(proc, 2, out)
    stop_server(server[0], signal.SIGKILL)  # the server and its workers, gone at once
    down = time.time()
    wait_for_epoch(proc, 20, out)  # training goes on while the server is away
    time.sleep(max(0.0, 12 - (time.time() - down)))
    server[0] = start_server(root, port)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert re.search(r"unreachable since \d\d:\d\d:\d\d, \d+ epochs? buffered; retrying \(training goes on\)", stderr)
    assert "answers again after" in stderr and "Traceback" not in stderr
    client = MlflowClient()
    run = only_run(client, "outage")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == list(range(1, 61))
    # The outage (12 s or more) was not training time: the run's training took about what its epochs took
    epochs = [float(t) for t in re.findall(r"^epoch +\d+/60 .* ([\d.]+)s$", "".join(out) + stdout, re.MULTILINE)]
    assert len(epochs) == 60 and run.data.metrics["train_seconds"] < sum(epochs) + 5
    assert client.search_model_versions(f"run_id = '{run.info.run_id}'")  # registered after the outage


def test_an_outage_that_outlasts_the_run_keeps_its_record_locally_until_sent(own_server, tiny_data):
    root, port, server = own_server
    proc, out = train(tiny_data, "lost", "train.epochs=8", "tracking.outage_wait=3"), []
    wait_for_epoch(proc, 1, out)
    stop_server(server[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2, stderr[-3000:]
    error = [line for line in stderr.splitlines() if line.startswith("fmnist train: error:")]
    assert len(error) == 1 and "still unreachable after waiting 3 s" in error[0] and "Traceback" not in stderr
    entry = error[0].split("send it with: fmnist sync ")[1].strip()
    assert os.path.isfile(os.path.join(entry, "ops.json"))

    server[0] = start_server(root, port)
    doctor = subprocess.run([sys.executable, "-m", "fmnist", "doctor"], capture_output=True, text=True, timeout=120)
    assert f"kept locally, not yet sent: {entry}" in doctor.stdout
    sync = subprocess.run([sys.executable, "-m", "fmnist", "sync"], capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0 and f"from {entry}" in sync.stdout, sync.stderr[-3000:]
    assert not os.path.exists(entry)
    client = MlflowClient()
    run = only_run(client, "lost")
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == list(range(1, 9))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {
        "evaluation/predictions.parquet", "evaluation/confusion_matrix.png"}
    assert [v.run_id for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")] == [run.info.run_id]


def test_no_server_at_start_is_reported_within_seconds_before_loading_data(tiny_data, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.time()
    proc = train(tiny_data, "nowhere", "train.epochs=2")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and time.time() - start < 30
    assert stderr.strip().splitlines()[-1].startswith("fmnist train: error: MLFLOW_TRACKING_URI=http://127.0.0.1:")
    assert "the tracking server does not answer" in stderr and "parameters" not in stdout  # no data was loaded


def test_a_killed_run_is_ended_failed_by_doctor(tracking_env, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    client = MlflowClient()
    proc, out = train(tiny_data, "killed", "train.epochs=100000"), []
    wait_for_epoch(proc, 2, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = only_run(client, "killed")
    assert run.info.status == "RUNNING"  # nothing could end it
    [stage] = (tmp_path / "fmnist" / "outbox").glob(f"{run.info.run_id}-*")  # its staged files, left behind
    result = subprocess.run([sys.executable, "-m", "fmnist", "doctor", "--experiment", "killed"],
                            capture_output=True, text=True, timeout=120)
    assert f"ended run {run.info.run_id} FAILED: its process {proc.pid}" in result.stdout, result.stderr
    assert f"removed {stage}: files staged by a process that died" in result.stdout and not stage.exists()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED" and f"process {proc.pid}" in run.data.tags["fmnist.end_reason"]


def test_concurrent_runs_on_a_new_and_an_existing_sqlite_store(tiny_data, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for round_, n in enumerate((3, 2)):  # three on a new store (its creation is the race), then two on it again
        procs = [train(tiny_data, "together", "train.epochs=3", f"train.seed={round_ * 3 + i}", cwd=tmp_path)
                 for i in range(n)]
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
    assert {client.get_experiment(r.info.experiment_id).name for r in runs} == {"together"}  # none in Default
    versions = client.search_model_versions("name = 'fmnist-ann'")
    assert len(versions) == 5
    best = max(versions, key=lambda v: (float(v.tags["val_accuracy"]), -int(v.version)))
    assert client.get_model_version_by_alias("fmnist-ann", "champion").version == best.version


def test_an_unwritable_artifact_location_is_refused_before_training(tiny_data, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "a-file").write_text("not a directory")  # refused even to root, unlike a chmod
    MlflowClient(uri).create_experiment("unwritable", artifact_location=str(tmp_path / "a-file" / "artifacts"))
    proc = train(tiny_data, "unwritable", "train.epochs=2", cwd=tmp_path)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2 and "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("fmnist train: error:")]
    assert "does not take files" in line and "it ended FAILED before training" in line
    assert "epoch" not in stdout
    run = only_run(MlflowClient(uri), "unwritable")
    assert run.info.status == "FAILED" and "does not take files" in run.data.tags["fmnist.end_reason"]


def test_a_signal_while_the_record_is_sent_ends_the_run_killed_and_keeps_the_rest(own_server, tiny_data):
    root, port, server = own_server
    proc, out = train(tiny_data, "late-signal", "train.epochs=3"), []
    for line in proc.stdout:  # the test metrics are printed; the model and registration are still to be sent
        out.append(line)
        if "test accuracy" in line:
            break
    os.killpg(server[0].pid, signal.SIGSTOP)  # the server hangs: the record waits in the queue
    try:
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        os.killpg(server[0].pid, signal.SIGCONT)
    assert proc.returncode == 143, stderr[-3000:]
    assert "interrupted while sending run" in stderr and "Traceback" not in stderr
    entry = stderr.split("send it with: fmnist sync ")[1].split()[0]
    sync = subprocess.run([sys.executable, "-m", "fmnist", "sync", entry], capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, sync.stderr[-3000:]
    client = MlflowClient()
    run = only_run(client, "late-signal")
    assert run.info.status == "FINISHED" and client.search_model_versions(f"run_id = '{run.info.run_id}'")


class RelayAtRunCreation:
    """A TCP relay to the tracking server. Once the server has answered a request to create a run, it either
    sends Ctrl-C to this process's main thread (waiting for that answer) and then passes the answer on, or, with
    `hang=True`, holds the answer back for good: a server that hangs mid-request (`created` is set then)."""

    def __init__(self, server_port: int, hang: bool = False):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.hang, self.creating, self.created = hang, threading.Event(), threading.Event()
        self.main = threading.main_thread().ident
        threading.Thread(target=self._accept, args=(server_port,), daemon=True).start()

    def _accept(self, server_port: int) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", server_port))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, request: bool) -> None:
        with source, sink, contextlib.suppress(OSError):  # OSError: the other side closed the connection
            while chunk := source.recv(65536):
                if request and b"/runs/create" in chunk:
                    self.creating.set()
                elif not request and self.creating.is_set():  # the run exists on the server now
                    self.creating.clear()
                    self.created.set()
                    if self.hang:
                        time.sleep(3600)
                    signal.pthread_kill(self.main, signal.SIGINT)
                    time.sleep(0.5)
                sink.sendall(chunk)


def test_a_second_ctrl_c_stops_a_run_held_up_by_a_hung_server_at_once_and_doctor_ends_it(own_server, tiny_data):
    """The first Ctrl-C waits for the request that creates the run (else a run would exist that this process could
    not name); when the server hangs there, a second one stops the process at once, and the run it left RUNNING
    is ended FAILED by `fmnist doctor` like any run whose process died."""
    _, port, _ = own_server
    relay = RelayAtRunCreation(port, hang=True)
    try:
        proc = train(tiny_data, "hung-at-creation", env={**os.environ, "MLFLOW_TRACKING_URI": relay.uri})
        assert relay.created.wait(60), "the run was never created"
        proc.send_signal(signal.SIGINT)
        time.sleep(2)
        assert proc.poll() is None  # held: the answer may still come
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        relay.listener.close()
    assert proc.returncode == 130 and "Ctrl-C again stops at once" in stderr and "Traceback" not in stderr, stderr
    client = MlflowClient(f"http://127.0.0.1:{port}")
    run = only_run(client, "hung-at-creation")
    assert run.info.status == "RUNNING"
    doctor = subprocess.run([sys.executable, "-m", "fmnist", "doctor", "--experiment", "hung-at-creation"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert f"ended run {run.info.run_id} FAILED" in doctor.stdout, doctor.stderr[-2000:]


def test_ctrl_c_while_a_run_is_being_created_ends_that_run_killed(own_server, monkeypatch):
    from fmnist.tracking import MLflowTracker, store

    _, port, _ = own_server
    tracker = MLflowTracker("created-under-ctrl-c")
    store.experiment_id("created-under-ctrl-c")
    relay = RelayAtRunCreation(port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", relay.uri)
    try:
        with pytest.raises(KeyboardInterrupt):
            with tracker.run("caught-mid-request"):
                pytest.fail("the run started after Ctrl-C")
    finally:
        relay.listener.close()
    run = only_run(MlflowClient(f"http://127.0.0.1:{port}"), "created-under-ctrl-c")
    assert run.info.status == "KILLED", run.info.status


def test_a_backlog_of_epochs_is_sent_in_a_few_requests_in_order(tracking_env, tmp_path):
    from fmnist.tracking.sender import Sender, sync

    backlog = [{"op": "metrics", "values": {"loss": 1 / epoch, "epoch": epoch}, "step": epoch,
                "timestamp": 1000 * epoch} for epoch in range(1, 1201)] + [
        {"op": "tags", "values": {"after": "the metrics"}}]  # what an outage or a slow server leaves queued
    client = MlflowClient()
    experiment = client.create_experiment("backlog")
    live, kept = (client.create_run(experiment).info.run_id for _ in range(2))
    sender = Sender(live, tmp_path)
    with sender.cond:  # queued at once, as the sender finds it when the server answers again
        sender.ops.extend(backlog)
        sender.cond.notify_all()
    sender.finish()
    assert not sender.ops and "errors" not in sender.state
    assert sender.requests == 4  # 2,400 metrics in 3 requests of at most 1,000, then the tag
    entry = tmp_path / "entry"  # the same backlog kept in an outbox entry, sent by fmnist sync
    entry.mkdir()
    (entry / "ops.json").write_text(json.dumps({"run_id": kept, "tracking_uri": tracking_env, "state": {},
                                                "ops": backlog}))
    assert sync(entry) == (kept, 1201, 4) and not entry.exists()
    for run_id in (live, kept):
        history = client.get_metric_history(run_id, "epoch")
        assert [(m.step, m.value, m.timestamp) for m in history] == [(e, e, 1000 * e) for e in range(1, 1201)]
        assert client.get_run(run_id).data.tags["after"] == "the metrics"


def test_writers_sharing_a_run_keep_their_own_staged_files(tracking_env, tmp_path):
    """The workers of a shared search all write to its parent run: the one that finishes first must not take the
    other's queued files with it (it did: one outbox folder per run id, removed by the first to close)."""
    from fmnist.tracking import MLflowTracker

    files = tmp_path / "files"
    files.mkdir()
    (files / "trials.csv").write_text("number,value\n0,0.9\n")
    tracker = MLflowTracker("shared-parent")
    with tracker.run("search") as first:
        with tracker.run("search", resume=first.id) as second:  # another worker joins the same parent run
            second.log_artifacts(files, "second")
        first.log_artifacts(files, "first")
    client = MlflowClient()
    assert {"first", "second"} <= {f.path for f in client.list_artifacts(first.id)}
    assert client.get_run(first.id).info.status == "FINISHED"
