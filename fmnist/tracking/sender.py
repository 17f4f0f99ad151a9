"""A run's record on its way to the tracking store: an ordered queue of operations that one thread sends.

Training never waits for the tracking server. Each operation (an epoch's metrics, tags, artifacts, the model, its
registration, the run's end) is queued and sent in order by a background thread, consecutive epochs' metrics in
one request. When the server does not answer, the queue keeps everything, one line says so, and sending resumes
where it stopped once the server is back. A run that ends while the server is still away writes what was not
sent, with the files it refers to, into its outbox folder (~/.cache/fmnist/outbox/<run id>-<suffix>); `fmnist sync`
sends it later, in the same order.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import mlflow
import numpy as np
import psutil
import requests
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from fmnist.data import cache_dir
from fmnist.errors import TrackingError, one_line

OPS = {}  # operation name -> function(client, run_id, state, **arguments)
MAX_METRICS = 1000  # MLflow's log_batch takes at most this many metrics per request
WRITER = "writer.json"  # in each stage folder: the host and process id of the process that fills it


def operation(fn):
    OPS[fn.__name__] = fn
    return fn


@operation
def params(client, run_id: str, state: dict, values: dict) -> None:
    items = [Param(k, v) for k, v in values.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


@operation
def tags(client, run_id: str, state: dict, values: dict) -> None:
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in values.items()])


@operation
def inputs(client, run_id: str, state: dict, datasets: list[dict]) -> None:
    batch = [DatasetInput(Dataset(**d["dataset"]), [InputTag("mlflow.data.context", d["context"])])
             for d in datasets]
    try:
        client.log_inputs(run_id, datasets=batch)
    except Exception as e:
        # Two runs logging the same new dataset at once: MLflow checks, then inserts, so the slower one fails the
        # unique constraint. The dataset exists by then, and asking again links it.
        if "UNIQUE constraint failed" not in str(e) and "duplicate key" not in str(e):
            raise
        client.log_inputs(run_id, datasets=batch)


@operation
def artifacts(client, run_id: str, state: dict, local_dir: str, artifact_path: str) -> None:
    client.log_artifacts(run_id, local_dir, artifact_path)


@operation
def model(client, run_id: str, state: dict, network: str, example: str) -> None:
    from fmnist.tracking.pyfunc import log_model

    state["model_uri"] = log_model(run_id, Path(network), np.load(example))
    print(f"model {state['model_uri']}", flush=True)


@operation
def register(client, run_id: str, state: dict, arch: str, val_accuracy: float) -> None:
    from fmnist.tracking.registry import register_model

    version, champion = register_model(state["model_uri"], arch, val_accuracy)
    print(f"registered fmnist-{arch} v{version}" + " (champion)" * champion, flush=True)


@operation
def end(client, run_id: str, state: dict, status: str, reason: str | None) -> None:
    if state.get("errors") and status == "FINISHED":  # part of the record was refused: not a complete run
        status, reason = "FAILED", "MLflow refused part of the record: " + "; ".join(state["errors"])
    if reason:
        client.set_tag(run_id, "fmnist.end_reason", reason)
    elif "fmnist.end_reason" in client.get_run(run_id).data.tags:  # a stale mark from while it was unreachable
        client.delete_tag(run_id, "fmnist.end_reason")
    client.set_terminated(run_id, status)


def transient(error: BaseException) -> bool:
    """Whether the store may answer if asked again: no connection, a timeout, a 5xx, a locked SQLite file."""
    seen = error
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if isinstance(seen, MlflowException):
            text = seen.message
            if ("failed with exception" in text or "Max retries exceeded" in text
                    or seen.get_http_status_code() >= 500 and "RESOURCE" not in str(seen.error_code)):
                return True
        if type(seen).__name__ == "OperationalError" and "locked" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def absolute_uri() -> str:
    """The tracking URI with a relative SQLite path made absolute, so it means the same from any directory."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def outbox_dir() -> Path:
    return cache_dir() / "outbox"


def new_stage(run_id: str) -> Path:
    """A folder of the outbox for one writer's staged files, which names the process that writes it."""
    outbox_dir().mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=outbox_dir()))
    (stage / WRITER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return stage


def discard_orphaned_stages() -> list[Path]:
    """Remove the stage folders whose writer, a process on this host, died before it could keep its record (a
    SIGKILL, a power cut): without an ops.json nothing in them can ever be sent, and their run is ended FAILED as
    stale. A live writer's folder, another host's and an outbox entry are left alone."""
    removed = []
    for writer in sorted(outbox_dir().glob(f"*/{WRITER}")):
        stage = writer.parent
        try:
            who = json.loads(writer.read_text())
            host, pid = who["host"], int(who["pid"])
        except (OSError, ValueError, TypeError, KeyError):  # not a writer file this code wrote: not ours to judge
            continue
        if (stage / "ops.json").exists() or host != socket.gethostname() or psutil.pid_exists(pid):
            continue
        shutil.rmtree(stage, ignore_errors=True)
        removed.append(stage)
    return removed


class Sender:
    """Sends one run's operations in order from a background thread, riding out store outages."""

    def __init__(self, run_id: str, stage: Path):
        self.run_id, self.stage = run_id, stage
        self.ops: deque[dict] = deque()
        self.state: dict = {}  # what later operations need: the logged model's URI, refusals so far
        self.cond = threading.Condition()
        self.stopping = self.abandon = False
        self.down_since: float | None = None
        self.requests = 0  # requests sent (consecutive epochs' metrics go as one)
        self.thread = threading.Thread(target=self._work, name="fmnist-tracking", daemon=True)
        self.thread.start()

    def put(self, name: str, **args) -> None:
        with self.cond:
            self.ops.append({"op": name, **args})
            self.cond.notify_all()

    def pending(self, name: str, key: str | None = None) -> bool:
        with self.cond:
            return any(op["op"] == name and (key is None or key in op.get("values", {})) for op in self.ops)

    def _work(self) -> None:
        client, delay = mlflow.MlflowClient(), 1.0
        while True:
            with self.cond:
                while not self.ops and not self.stopping:
                    self.cond.wait()
                if not self.ops or self.abandon:
                    return
                head = list(itertools.islice(self.ops, next_request(self.ops)))
            try:
                send(client, self.run_id, self.state, head)
                self.requests += 1
            except Exception as e:
                if transient(e):
                    self._down()
                    with self.cond:
                        self.cond.wait(delay)  # a stop() wakes it at once
                    delay = min(delay * 2, 10.0)  # a retry every 10 s at most: quick to resume, light on a server
                    continue
                self.state.setdefault("errors", []).append(f"{head[0]['op']}: {one_line(e)[:300]}")
            with self.cond:
                for _ in head:
                    self.ops.popleft()
                self.cond.notify_all()
            if self.down_since is not None:
                print(f"fmnist: tracking store {mlflow.get_tracking_uri()} answers again after "
                      f"{time.time() - self.down_since:.0f} s; sending the buffered record", file=sys.stderr,
                      flush=True)
                self.down_since = None
            delay = 1.0

    def _down(self) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            epochs = sum(op["op"] == "metrics" and "val_accuracy" in op["values"] for op in list(self.ops))
            print(f"fmnist: tracking store {mlflow.get_tracking_uri()} unreachable since "
                  f"{time.strftime('%H:%M:%S', time.localtime(self.down_since))}, {epochs} epoch"
                  f"{'s' * (epochs != 1)} buffered; retrying (training goes on)", file=sys.stderr, flush=True)

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued is sent; False if the store is still away after `timeout` seconds of
        waiting with no progress."""
        with self.cond:
            deadline = time.monotonic() + timeout
            left = len(self.ops)
            while self.ops:
                if time.monotonic() >= deadline:
                    return False
                self.cond.wait(min(1.0, max(0.01, deadline - time.monotonic())))
                if len(self.ops) < left:  # progress: the store answers, give it the full time again
                    left, deadline = len(self.ops), time.monotonic() + timeout
        return True

    def stop(self, wait: float = 120) -> None:
        """Stop after the operation being sent (if any, for at most `wait` seconds); what is not sent stays in
        self.ops, the operation in flight included."""
        with self.cond:
            self.stopping = self.abandon = True
            self.cond.notify_all()
        self.thread.join(timeout=wait)

    def finish(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=120)

    def keep(self) -> Path:
        """Write what was not sent into the stage folder, which becomes the run's outbox entry."""
        with self.cond:
            ops = list(self.ops)
        (self.stage / "ops.json").write_text(json.dumps({"run_id": self.run_id, "tracking_uri": absolute_uri(),
                                                         "state": self.state, "ops": ops}, indent=1))
        return self.stage


def next_request(ops) -> int:
    """How many operations at the head of `ops` go as one request: one, or the run of consecutive epochs' metrics
    (up to MAX_METRICS values), so a backlog left by an outage or a slow server drains in a few requests, not one
    per epoch."""
    if ops[0]["op"] != "metrics":
        return 1
    n, size = 1, len(ops[0]["values"])
    for op in itertools.islice(ops, 1, None):
        if op["op"] != "metrics" or size + len(op["values"]) > MAX_METRICS:
            break
        n, size = n + 1, size + len(op["values"])
    return n


def send(client, run_id: str, state: dict, head: list[dict]) -> None:
    """One request for the operations next_request grouped: epochs' metrics in one batch, or one operation."""
    if head[0]["op"] == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, float(v), op["timestamp"], op["step"])
                                          for op in head for k, v in op["values"].items()])
    else:
        args = {k: v for k, v in head[0].items() if k != "op"}
        OPS[head[0]["op"]](client, run_id, state, **args)


def sync(entry: Path) -> tuple[str, int, int]:
    """Send one outbox entry to the tracking store it names (or MLFLOW_TRACKING_URI, if set); returns the run id,
    the operations sent and the requests they took.
    What was sent is removed from the entry, so an interrupted sync resumes where it stopped."""
    path = entry / "ops.json"
    if not path.is_file():
        raise TrackingError(f"{entry}: no ops.json; expected an outbox entry (a folder under {outbox_dir()})")
    record = json.loads(path.read_text())
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(record["tracking_uri"])
    client, operations, requests = mlflow.MlflowClient(), len(record["ops"]), 0
    while record["ops"]:
        n = next_request(record["ops"])
        try:
            send(client, record["run_id"], record["state"], record["ops"][:n])
        except Exception as e:
            where = mlflow.get_tracking_uri()
            raise TrackingError(f"{entry}: sending {record['ops'][0]['op']} to {where} failed "
                                f"({one_line(e)[:300]}); {len(record['ops'])} operations left, "
                                "run fmnist sync again") from None
        del record["ops"][:n]
        requests += 1
        path.write_text(json.dumps(record, indent=1))
    shutil.rmtree(entry)
    return record["run_id"], operations, requests
