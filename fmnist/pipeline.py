"""One pipeline for a training run and a search trial: data -> model -> what trains on what -> fit -> evaluation ->
the record, kept by a tracker.

A tracker gives runs (the `Run` protocol below): fmnist.tracking.MLflowTracker in use, `NullTracker` in tests and
for `fmnist train --dry-run`. A trial is the same call with `trial=True`: no test set, no model, no registry.
The test metrics are those of the program the run logs as its model, computed by the same code that serves it.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fmnist import data as fdata
from fmnist.config import Config, is_uri
from fmnist.data import Dataset, Teacher
from fmnist.errors import ConfigError, Pruned, one_line
from fmnist.evaluate import write_evaluation
from fmnist.features import Prepared, prepare
from fmnist.models import build_model
from fmnist.predict import Classifier, export_network
from fmnist.train import Callback, History, Runtime, fit, predict_logits, resolve_runtime


class Run(Protocol):
    id: str

    def log_params(self, params: dict[str, object]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def describe(self, text: str) -> None: ...
    def log_inputs(self, data: Dataset) -> None: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None: ...
    def log_model(self, network: Path, example: np.ndarray) -> None: ...
    def register(self, arch: str, val_accuracy: float) -> None: ...


class Tracker(Protocol):
    def run(self, name: str | None = None, parent: str | None = None, tags: dict[str, str] | None = None,
            resume: str | None = None) -> AbstractContextManager[Run]: ...


@dataclass
class NullRun:
    """A run that sends nothing anywhere: it keeps what it is given in memory, and files in `folder`."""
    id: str
    folder: Path
    parent: str | None = None
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # name -> [(step, value), ...]
    tags: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # artifact path -> sorted file names (copied under folder)
    model: Path | None = None  # the copy of the logged program
    registered: tuple | None = None
    status: str = "RUNNING"

    def log_params(self, params):
        self.params |= params

    def log_metrics(self, metrics, step=0):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, v))

    def on_epoch_end(self, epoch, metrics):
        self.log_metrics(metrics, step=epoch)

    def set_tags(self, tags):
        self.tags |= tags

    def describe(self, text):
        self.tags["mlflow.note.content"] = text

    def log_inputs(self, data):
        self.tags["inputs"] = data.digest

    def log_artifacts(self, local_dir, artifact_path):
        shutil.copytree(local_dir, self.folder / artifact_path, dirs_exist_ok=True)
        self.artifacts[artifact_path] = sorted(p.name for p in Path(local_dir).iterdir())

    def log_model(self, network, example):
        self.model = self.folder / "model" / Path(network).name
        self.model.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(network, self.model)

    def register(self, arch, val_accuracy):
        self.registered = (arch, val_accuracy)


class NullTracker:
    """Tracking switched off: runs live in `self.runs`, their files under `folder` (a new temporary folder if
    none is given)."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="fmnist-untracked-"))
        self.runs: list[NullRun] = []

    @contextmanager
    def run(self, name=None, parent=None, tags=None, resume=None):
        run_id = resume or f"untracked-{len(self.runs)}"
        run = NullRun(run_id, self.folder / run_id, parent, tags=dict(tags or {}))
        self.runs.append(run)
        try:
            yield run
        except Pruned:
            run.status = "FINISHED"
            raise
        except KeyboardInterrupt:
            run.status = "KILLED"
            raise
        except BaseException:
            run.status = "FAILED"
            raise
        run.status = "FINISHED"


@dataclass
class Outcome:
    run_id: str
    history: History
    metrics: dict[str, float]  # the run's summary; for a training run also its test and evaluation metrics


def build(cfg: Config) -> tuple[torch.nn.Module, Runtime]:
    """The model and where it runs. The seed is set here, once: the initial weights follow train.seed too."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, **cfg.model.params)
    return model, resolve_runtime(cfg.train, model)


def run_experiment(cfg: Config, tracker: Tracker, data: Dataset | None = None, parent: str | None = None,
                   callbacks: list[Callback] = (), tags: dict[str, str] | None = None, trial: bool = False) -> Outcome:
    """Train one configuration as one run (nested under `parent`); a `trial` stops after validation."""
    data = data or fdata.load(cfg.data.data_dir, cfg.data.val_fraction, cfg.train.seed)
    model, rt = build(cfg)  # before the run starts: a bad dataset or option leaves no run behind
    data = with_teacher(data, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{cfg.model.arch}: {n_params:,} parameters ({n_trained:,} trained) on {rt.describe()}; data "
          f"{data.source} (train {len(data.y_train)}, validation {len(data.y_val)}, test {len(data.y_test)})",
          flush=True)
    with tracker.run(cfg.tracking.run_name, parent=parent, tags=tags) as run:
        run.log_params(cfg.flat())
        run.set_tags({"architecture": cfg.model.arch, "device": rt.describe(), "torch_version": torch.__version__,
                      "dataset_digest": data.digest} |
                     ({"teacher_run_id": data.teacher.run_id} if data.teacher and data.teacher.run_id else {}))
        if not trial:
            run.log_inputs(data)
        prepared = prepare(model, data, rt, cfg.train)
        run.log_metrics({"params_count": n_params, "params_trained": n_trained} | prepared.metrics)
        run.set_tags(prepared.tags)
        try:
            history = fit(prepared.model, prepared.data, prepared.train, rt, [run, *callbacks])
        except Pruned:
            run.set_tags({"trial_state": "PRUNED"})
            raise
        summary = {"best_val_accuracy": history.best_val_accuracy, "best_epoch": history.best_epoch,
                   "train_seconds": history.seconds, "epochs_run": len(history.epochs)}
        if trial:
            run.log_metrics(summary)
            run.set_tags({"trial_state": "COMPLETE"})
            return Outcome(run.id, history, summary)
        with tempfile.TemporaryDirectory() as tmp:
            metrics, network = evaluate_model(model, prepared, data, rt, cfg, history, Path(tmp))
            run.log_metrics(summary | metrics)
            run.log_artifacts(Path(tmp) / "evaluation", "evaluation")
            if cfg.tracking.log_model:
                run.log_model(network, data.x_test[:2].numpy())
                if cfg.tracking.register:
                    run.register(cfg.model.arch, history.best_val_accuracy)
        line = describe(cfg, summary | metrics)
        run.describe(line)
        print(f"{line}; run {run.id}", flush=True)
        return Outcome(run.id, history, summary | metrics)


def with_teacher(data: Dataset, cfg: Config) -> Dataset:
    """The data with train.teacher's class probabilities for each training image, from its saved program run as
    its model serves it. A search computes them once: its trials share the training split, and so the teacher."""
    spec = cfg.train.teacher
    if not spec:
        return dataclasses.replace(data, teacher=None) if data.teacher else data
    if data.teacher and data.teacher.source == spec:
        return data
    if is_uri(spec) or Path(spec).is_dir():
        from fmnist.tracking.pyfunc import load_teacher  # a logged model is MLflow's to read

        teacher, run_id = load_teacher(spec)
    else:
        try:
            teacher, run_id = Classifier.load(spec), None
        except Exception as e:  # torch.export.load's errors have no common type
            raise ConfigError(f"train.teacher={spec}: not a saved fmnist network ({one_line(e)})") from None
    try:
        probabilities = torch.from_numpy(teacher.probabilities(data.x_train.numpy()))
    except Exception as e:  # a program for other inputs fails inside torch, with no common type either
        raise ConfigError(f"train.teacher={spec}: does not take 28x28 images ({one_line(e)})") from None
    if probabilities.shape[1] != len(data.classes):
        raise ConfigError(f"train.teacher={spec}: answers {probabilities.shape[1]} classes; expected "
                          f"{len(data.classes)}")
    return dataclasses.replace(data, teacher=Teacher(spec, run_id, probabilities))


def evaluate_model(model: torch.nn.Module, prepared: Prepared, data: Dataset, rt: Runtime, cfg: Config,
                   history: History, folder: Path) -> tuple[dict[str, float], Path]:
    """Test metrics of the saved program the run logs as its model (through the Classifier that serves it), and
    the training split's accuracy in eval mode, without augmentation, from the training code."""
    train_inputs = prepared.data.x_train[:len(data.y_train)]  # the split itself, not a flipped copy
    train_pred = predict_logits(prepared.model, train_inputs, rt, cfg.train.eval_batch_size).argmax(1)
    network = folder / "model" / "network.pt2"
    network.parent.mkdir()
    torch.export.save(export_network(model, data.x_test[:2].numpy()), network)
    probabilities = Classifier.load(network).probabilities(data.x_test.numpy())
    metrics = write_evaluation(folder / "evaluation", data.x_test.numpy(), data.y_test.numpy(), probabilities,
                               data.y_train.numpy(), train_pred.numpy(), data.classes, history.epochs)
    return metrics, network


def describe(cfg: Config, metrics: dict[str, float]) -> str:
    """The run's one-line summary: architecture, key settings, test accuracy."""
    model = " ".join(f"{k.removeprefix('model.')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                     for k, v in cfg.flat().items() if k.startswith("model.") and k != "model.arch")
    t = cfg.train
    return (f"{cfg.model.arch} ({model}; {t.epochs} epochs, lr {t.lr:g}, batch {t.batch_size}, seed {t.seed}): "
            f"test accuracy {metrics['test_accuracy']:.4f}, macro F1 {metrics['test_macro_f1']:.4f}, "
            f"ECE {metrics['test_ece']:.4f}, best epoch {metrics['best_epoch']}, {metrics['train_seconds']:.0f} s")
