"""The only module that talks to MLflow: runs, params, metrics, dataset inputs, artifacts and models.

Works with any MLFLOW_TRACKING_URI (the embedded sqlite:///mlflow.db default, or a server). Under `mlflow run`
the run already exists (MLFLOW_RUN_ID) and is resumed rather than created.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature, infer_signature

from fmnist.config import Config
from fmnist.data import Dataset
from fmnist.predict import Classifier, export_network
from fmnist.train import Pruned


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run is closed as KILLED like after Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


class EpochLogger:
    """Training callback: each epoch's metrics, with the epoch as MLflow step."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=epoch)


@contextmanager
def tracked_run(experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None, run_id: str | None = None):
    """Start (or resume) a run and always end it: FINISHED, KILLED on Ctrl-C or SIGTERM, FAILED on an error.

    Under `mlflow run` the run exists already (MLFLOW_RUN_ID) and is resumed, in its own experiment. With
    `parent_run_id` the run is nested under that run, in the parent's experiment (a study's or a search's member).
    With `run_id` that existing run is resumed.
    """
    experiment_id = None
    if run_id:
        os.environ.pop("MLFLOW_RUN_ID", None)  # else the next nested run would resume `mlflow run`'s run instead
    elif parent_run_id:
        experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
    elif not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals can only be set there
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    run = mlflow.start_run(run_id=run_id, run_name=run_name, experiment_id=experiment_id, tags=tags,
                           nested=parent_run_id is not None, parent_run_id=parent_run_id)
    try:
        yield run
    except Pruned:  # a search stopped this trial on purpose: finished early, not failed
        mlflow.set_tag("trial_state", "PRUNED")
        mlflow.end_run("FINISHED")
        raise
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def log_setup(cfg: Config, data: Dataset, runtime: str, n_params: int, n_trained: int, inputs: bool = True) -> None:
    """The resolved config as params, the dataset splits as inputs, and tags saying where the run ran."""
    mlflow.log_params({k: _param(v) for k, v in cfg.flat().items()})
    mlflow.log_metrics({"params_count": n_params, "params_trained": n_trained})
    tags = {"architecture": cfg.model.arch, "device": runtime, "torch_version": torch.__version__,
            "dataset_digest": data.digest}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    mlflow.set_tags(tags)
    if not inputs:
        return
    for context, x, y in (("train", data.x_train, data.y_train), ("validation", data.x_val, data.y_val),
                          ("test", data.x_test, data.y_test)):
        dataset = mlflow.data.from_numpy(x.numpy(), targets=y.numpy(), source=data.source,
                                         name=f"fashion-mnist-{context}", digest=f"{data.digest}-{context}")
        mlflow.log_input(dataset, context=context)


def log_trial_result(best_val_accuracy: float, seconds: float, best_epoch: int) -> None:
    mlflow.log_metrics({"best_val_accuracy": best_val_accuracy, "train_seconds": seconds, "best_epoch": best_epoch})
    mlflow.set_tag("trial_state", "COMPLETE")


def log_feature_extraction(seconds: float, cache_hit: bool) -> None:
    mlflow.log_metric("feature_seconds", seconds)
    mlflow.set_tag("feature_cache", "hit" if cache_hit else "miss")


def log_results(metrics: dict[str, float], report_dir: Path, seconds: float, best_epoch: int) -> None:
    mlflow.log_metrics(metrics | {"train_seconds": seconds, "best_epoch": best_epoch})
    mlflow.log_artifacts(str(report_dir), artifact_path="evaluation")


class PyfuncClassifier(mlflow.pyfunc.PythonModel):
    """The logged model: raw uint8 (N, 28, 28) images in, a table of class name and per-class probabilities out."""

    def load_context(self, context):
        self.classifier = Classifier(torch.export.load(context.artifacts["network"]).module())

    def predict(self, context, model_input: np.ndarray, params=None):  # the hint: no MLflow input schema
        return self.classifier.predict(model_input)


def log_model(model: torch.nn.Module, example: np.ndarray) -> str:
    """Log the model as a pyfunc: `mlflow.pyfunc.load_model(uri).predict(raw_uint8_images)` gives class names and
    probabilities. The network travels as a torch.export program, this package's code beside it.
    """
    network = export_network(model, example)
    output = Classifier(network.module()).predict(example)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network.pt2"
        torch.export.save(network, path)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")), artifacts={"network": str(path)},
            code_paths=[str(Path(__file__).parent)], input_example=example,
            # Output schema only: MLflow's input enforcement would refuse a (28, 28) image and answer a float
            # batch with a dump of the data; Classifier checks the input and says what it expected.
            signature=ModelSignature(inputs=None, outputs=infer_signature(example, output).outputs),
            # explicit, because inferring them loads the model once more in a subprocess
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                              "numpy", "pandas", "pyyaml", "tqdm"])
    return info.model_uri


def load_classifier(model_uri: str):
    """A logged or registered model (`models:/fmnist-cnn@champion`, `runs:/<id>/model`) as a pyfunc model."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise LookupError(f"--model {model_uri}: cannot load it from {mlflow.get_tracking_uri()} "
                          f"({getattr(e, 'message', e)})") from None


CHAMPION = "champion"


def register_model(model_uri: str, arch: str, val_accuracy: float) -> tuple[str, bool]:
    """Register the logged model as `fmnist-<arch>`; move the `champion` alias to it only when its validation
    accuracy beats the current champion's (never the test accuracy: that would select on the test set).

    Returns the new version and whether it became the champion.
    """
    client, name = mlflow.MlflowClient(), f"fmnist-{arch}"
    version = mlflow.register_model(model_uri, name).version
    client.set_model_version_tag(name, version, "val_accuracy", f"{val_accuracy:.6f}")
    try:
        champion = float(client.get_model_version_by_alias(name, CHAMPION).tags["val_accuracy"])
    except (mlflow.exceptions.MlflowException, KeyError, ValueError):
        champion = float("-inf")  # no champion yet
    if val_accuracy > champion:
        client.set_registered_model_alias(name, CHAMPION, version)
    return version, val_accuracy > champion


def current_experiment(default: str) -> str:
    """The experiment of the run `mlflow run` created for this process (MLFLOW_RUN_ID), else `default`."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    return run_experiment_name(run_id) if run_id else default


def run_experiment_name(run_id: str) -> str:
    client = mlflow.MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def finished_training_runs(experiment: str, filter_string: str = ""):
    """The experiment's FINISHED runs that trained an architecture, as a pandas DataFrame (MLflow's search API)."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"--experiment {experiment}: no such MLflow experiment at {mlflow.get_tracking_uri()}")
    query = " and ".join(f for f in ("attributes.status = 'FINISHED'", filter_string) if f)
    try:
        return mlflow.search_runs([found.experiment_id], filter_string=query, output_format="pandas")
    except mlflow.exceptions.MlflowException as e:
        raise LookupError(f"--filter {filter_string!r}: MLflow refused it ({e.message})") from None


def tag_search(study_name: str, storage: str, space: dict) -> None:
    mlflow.set_tags({"fmnist.kind": "search", "optuna.study": study_name, "optuna.storage": storage})
    mlflow.log_dict(space, "search/space.yaml")


def log_search(trials, best: dict | None, figures: dict) -> None:
    """The study so far on the parent run: every trial as CSV, the best trial, Optuna's plots."""
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        trials.to_csv(Path(tmp) / "trials.csv", index=False)
        mlflow.log_artifact(str(Path(tmp) / "trials.csv"), "search")
    for name, figure in figures.items():
        mlflow.log_figure(figure, f"search/{name}.png")
        plt.close(figure)
    counts = trials["state"].value_counts() if len(trials) else {}
    mlflow.log_metrics({f"trials_{state.lower()}": int(n) for state, n in dict(counts).items()})
    if best:
        mlflow.log_metrics({"best_val_accuracy": best["value"], "best_trial": best["trial"]})
        mlflow.log_dict(best, "search/best.json")
        mlflow.set_tags({f"best.{k}": str(v) for k, v in best["params"].items()})


def end_stale_run(run_id: str) -> None:
    """The run of a trial whose worker died (SIGKILL, a lost machine) ends FAILED instead of RUNNING forever."""
    client = mlflow.MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "trial_state", "STALE")
        client.set_terminated(run_id, "FAILED")


def tag_study(archs: list[str]) -> None:
    mlflow.set_tags({"fmnist.kind": "study", "study.architectures": ",".join(archs)})


def study_filter(parent_run_id: str) -> str:
    """The search filter that selects exactly the runs of one study (its children)."""
    return f"tags.mlflow.parentRunId = '{parent_run_id}'"


def log_comparison(experiment: str, report_dir: Path, compared: dict[str, str], select: str,
                   parent_run_id: str | None = None) -> str:
    """A `comparison` run holding the report, tagged with the id of each run it compared; returns its id."""
    with tracked_run(experiment, "comparison", parent_run_id) as run:
        mlflow.set_tags({"fmnist.kind": "comparison", "selected_by": select}
                        | {f"compared.{arch}": run_id for arch, run_id in compared.items()})
        mlflow.log_artifacts(str(report_dir), artifact_path="comparison")
        return run.info.run_id


def serve(host: str, port: int, root: Path, workers: int = 1) -> None:
    """Replace this process with `mlflow server`: a sqlite store and artifacts served by the server, under root."""
    root.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", str(workers),
            "--backend-store-uri", f"sqlite:///{(root / 'mlflow.db').resolve()}",
            "--artifacts-destination", str((root / "mlartifacts").resolve())]
    print(" ".join(argv[2:]), flush=True)
    os.execv(sys.executable, argv)


def _param(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
