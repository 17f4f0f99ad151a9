"""The only code that talks to MLflow: the pipeline's tracker (fmnist.pipeline.Tracker) on an MLflow store.

Each run's record travels through `sender` (ordered, buffered, survives outages of the server); `store` finds
the server, the experiment and dead runs; `registry` is the champion policy; `pyfunc` the logged model;
`server` the `fmnist server` launcher. Works with any MLFLOW_TRACKING_URI: the embedded sqlite:///mlflow.db
default, or a server. Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and is adopted.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.data.sources import LocalArtifactDatasetSource

from fmnist.errors import Pruned, TrackingError, UserError, one_line
from fmnist.signals import HeldSignals
from fmnist.tracking import store
from fmnist.tracking.sender import Sender, discard_orphaned_stages, new_stage

if TYPE_CHECKING:
    from fmnist.data import Dataset

SYSTEM_INTERVAL = 10  # seconds between system metric samples (CPU, memory, disk, network; GPU where present)


class MLflowTracker:
    """Runs in one MLflow experiment. Creating it checks that the tracking store answers."""

    def __init__(self, experiment: str, heartbeat: float = 30, outage_wait: float = 60):
        store.configure_http()
        store.check_reachable()
        store.open_store()
        self.experiment, self.heartbeat, self.outage_wait = experiment, heartbeat, outage_wait

    @contextmanager
    def run(self, name: str | None = None, parent: str | None = None, tags: dict[str, str] | None = None,
            resume: str | None = None):
        """Start a run (nested under `parent`), or resume run `resume`, or adopt `mlflow run`'s, and always end
        it: FINISHED, KILLED on Ctrl-C or SIGTERM, FAILED on an error, with the reason in `fmnist.end_reason`."""
        client = mlflow.MlflowClient()
        run_id = resume or (None if parent else os.environ.pop("MLFLOW_RUN_ID", None))  # None: a new run
        run = None
        try:  # from here on, whatever happens, a run that exists is ended
            experiment_id = None
            if not run_id:  # a new run, in its parent's experiment or this tracker's
                experiment_id = (client.get_run(parent).info.experiment_id if parent
                                 else store.experiment_id(self.experiment))
            with HeldSignals():  # a Ctrl-C mid-request would leave a run on the server that this process cannot name
                run_id = self._open(client, run_id, experiment_id, name, parent, tags)
            if not parent:  # a top-level run repairs its experiment: runs whose process died are ended FAILED
                for stale, reason in store.end_stale_runs([client.get_run(run_id).info.experiment_id]):
                    print(f"fmnist: ended run {stale} FAILED: {reason}", file=sys.stderr)
                for stage in discard_orphaned_stages():
                    print(f"fmnist: removed {stage}: files staged by a process that died", file=sys.stderr)
            probe_artifacts(client, run_id)
            run = MLflowRun(run_id, self.heartbeat, self.outage_wait)
            yield run
        except Pruned:  # a search stopped this trial on purpose: finished early, not failed
            end(run, run_id, "FINISHED", None)
            raise
        except KeyboardInterrupt as e:
            end(run, run_id, "KILLED", f"interrupted ({e or 'Ctrl-C'})")
            raise
        except BaseException as e:
            message = one_line(e)[:500]
            end(run, run_id, "FAILED", message if isinstance(e, UserError) else f"{type(e).__name__}: {message}")
            raise
        else:
            run.close("FINISHED")

    def _open(self, client: mlflow.MlflowClient, run_id: str | None, experiment_id: str | None, name: str | None,
              parent: str | None, tags: dict[str, str] | None) -> str:
        """Mark run `run_id` RUNNING again, or create a new run in `experiment_id` (nested under `parent`); returns
        its id. Only these requests hold a signal back (MLflow's HTTP timeout and retries bound the wait; a second
        Ctrl-C does not wait)."""
        liveness = store.liveness_tags(self.heartbeat)
        if run_id:
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in
                                           {**(tags or {}), **liveness}.items()])
            return run_id
        nesting = {"mlflow.parentRunId": parent} if parent else {}
        return client.create_run(experiment_id, run_name=name, tags=(tags or {}) | liveness | nesting).info.run_id


def probe_artifacts(client: mlflow.MlflowClient, run_id: str) -> None:
    """The run's first artifact doubles as the check that the artifact location takes files, before training."""
    try:
        client.log_dict(run_id, {"argv": sys.argv, "pid": os.getpid(), "git_commit": _git_commit()},
                        "fmnist/launch.json")
    except Exception as e:
        reason = (f"artifact location {client.get_run(run_id).info.artifact_uri} does not take files "
                  f"({one_line(e)[:200]})")
        raise TrackingError(f"run {run_id}: {reason}; it ended FAILED before training") from None


def end(run: MLflowRun | None, run_id: str | None, status: str, reason: str | None) -> None:
    """End a run that stopped on an error or a signal: through its queue if it has one, else directly."""
    if run is not None:
        run.close(status, reason, raise_outage=False)
    elif run_id is not None:  # None: stopped before the run was created
        store.end_now(run_id, status, reason)


class MLflowRun:
    """One run as the pipeline sees it (fmnist.pipeline.Run): every call queues and returns at once."""

    def __init__(self, run_id: str, heartbeat: float, outage_wait: float):
        self.id, self.outage_wait = run_id, outage_wait
        # Files queued for sending; the outbox entry if the store is away. One folder per writer: the workers of
        # a shared search all write to its parent run, and the first to finish removes its own folder.
        self.stage = new_stage(run_id)
        self.sender = Sender(run_id, self.stage)
        self.pulse = Pulse(self.sender, heartbeat)

    def log_params(self, params: dict[str, object]) -> None:
        self.sender.put("params", values={k: _param(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.sender.put("metrics", values=dict(metrics), step=step, timestamp=int(time.time() * 1000))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_metrics(metrics, step=epoch)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.sender.put("tags", values={k: str(v) for k, v in tags.items()})

    def describe(self, text: str) -> None:
        """The one-line summary the MLflow UI shows on the run's page."""
        self.set_tags({"mlflow.note.content": text})

    def log_inputs(self, data: Dataset) -> None:
        """The train/validation/test splits as MLflow dataset inputs, with their content digests."""
        datasets = []
        for context, x, y in (("train", data.x_train, data.y_train), ("validation", data.x_val, data.y_val),
                              ("test", data.x_test, data.y_test)):
            dataset = mlflow.data.from_numpy(x.numpy(), targets=y.numpy(), source=LocalArtifactDatasetSource(
                data.source), name=f"fashion-mnist-{context}", digest=f"{data.digest}-{context}")
            datasets.append({"dataset": dataset.to_dict(), "context": context})
        self.sender.put("inputs", datasets=datasets)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        copy = self._stage(local_dir, artifact_path)
        self.sender.put("artifacts", local_dir=str(copy), artifact_path=artifact_path)

    def log_model(self, network: Path, example) -> None:
        import numpy as np

        folder = self._stage(network.parent, "model")
        np.save(folder / "example.npy", example)
        self.sender.put("model", network=str(folder / network.name), example=str(folder / "example.npy"))

    def register(self, arch: str, val_accuracy: float) -> None:
        """Register the model logged just before as fmnist-<arch> (see fmnist.tracking.registry)."""
        self.sender.put("register", arch=arch, val_accuracy=float(val_accuracy))

    def _stage(self, local_dir: Path, name: str) -> Path:
        """A copy the sender can read later: the caller's temporary folder may be gone by then."""
        copy = self.stage / f"{len(list(self.stage.iterdir()))}-{name.replace('/', '_')}"
        shutil.copytree(local_dir, copy)
        return copy

    def close(self, status: str, reason: str | None = None, raise_outage: bool = True) -> None:
        """Send the rest and end the run; if the store stays away, keep the rest in the outbox and say so."""
        try:
            self.pulse.stop()  # its last sample
            self.sender.put("end", status=status, reason=reason)
            sent = self.sender.drain(self.outage_wait)
        except KeyboardInterrupt:  # interrupted while logging or registering: keep the rest, end it KILLED
            self.sender.stop(wait=5)  # a request in flight to a server that does not answer is not waited for
            entry = self.sender.keep()
            store.end_now(self.id, "KILLED", f"interrupted while sending its record; the rest is kept in {entry}")
            print(f"fmnist: interrupted while sending run {self.id}'s record; the rest is kept in {entry}; send "
                  f"it with: fmnist sync {entry}", file=sys.stderr, flush=True)
            raise
        if sent:
            self.sender.finish()
            shutil.rmtree(self.stage, ignore_errors=True)
            errors = self.sender.state.get("errors")
            if errors and raise_outage:
                raise TrackingError(f"run {self.id}: MLflow refused part of its record, so it ended FAILED: "
                                    + "; ".join(errors))
            return
        self.sender.stop(wait=5)
        entry = self.sender.keep()
        message = (f"tracking store {mlflow.get_tracking_uri()} still unreachable after waiting "
                   f"{self.outage_wait:.0f} s: run {self.id}'s record is kept in {entry}; send it with: "
                   f"fmnist sync {entry}")
        if raise_outage:
            raise TrackingError(message)
        print(f"fmnist: {message}", file=sys.stderr, flush=True)


class Pulse:
    """Heartbeats (so a run whose process died can be told from a live one) and system metrics, on a timer."""

    def __init__(self, sender: Sender, heartbeat: float):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.sender, self.heartbeat = sender, heartbeat
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # no NVIDIA GPU or no pynvml: CPU metrics only
            pass
        self.stopped, self.step = threading.Event(), 0
        self.thread = threading.Thread(target=self._beat, name="fmnist-pulse", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        tick = min(self.heartbeat, SYSTEM_INTERVAL)
        next_beat = next_sample = time.monotonic()
        while not self.stopped.wait(tick):
            now = time.monotonic()
            if now >= next_sample:
                self.sample()
                next_sample = now + SYSTEM_INTERVAL
            if now >= next_beat and not self.sender.pending("tags", store.BEAT_TAG):
                self.sender.put("tags", values={store.BEAT_TAG: f"{time.time():.0f}"})
                next_beat = now + self.heartbeat

    def sample(self) -> None:
        values = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            values |= {f"system/{k}": v for k, v in monitor.aggregate_metrics().items()}
            monitor.clear_metrics()
        self.sender.put("metrics", values=values, step=self.step, timestamp=int(time.time() * 1000))
        self.step += 1

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self.sample()  # the last stretch, and the one sample of a run shorter than the interval


def _param(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
