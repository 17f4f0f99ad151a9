"""One tracked experiment end to end: data -> model -> fit -> test evaluation -> MLflow run; a search trial (the
same, validation only); and the study (every architecture, then the comparison)."""
from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fmnist import data as fdata
from fmnist import tracking
from fmnist.config import Config, load_config
from fmnist.data import Dataset
from fmnist.evaluate import write_report
from fmnist.features import frozen_features
from fmnist.models import build_model
from fmnist.models.transfer import TransferNet
from fmnist.train import Callback, History, Runtime, fit, predict_logits, resolve_runtime


def run_experiment(cfg: Config, parent_run_id: str | None = None, data: Dataset | None = None) -> str:
    """Train and evaluate one configuration, logging everything to one MLflow run; returns the run id.

    Data and model are built before the run starts, so a bad dataset or option leaves no run behind.
    """
    data = data or fdata.load(cfg.data.data_dir, cfg.data.val_fraction, cfg.train.seed)
    model, runtime = build(cfg, data)
    with tracking.tracked_run(cfg.tracking.experiment, cfg.tracking.run_name, parent_run_id) as run:
        tracking.log_setup(cfg, data, runtime.describe(), *count_params(model))
        trained, x_test, history = train(model, data, cfg, runtime, [tracking.EpochLogger()])
        y_pred = predict_logits(trained, x_test, runtime, cfg.train.eval_batch_size).argmax(1).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            metrics = write_report(Path(tmp), data.x_test.numpy(), data.y_test.numpy(), y_pred, data.classes,
                                   history.epochs)
            tracking.log_results(metrics | {"best_val_accuracy": history.best_val_accuracy}, Path(tmp),
                                 history.seconds, history.best_epoch)
        model_note = "model not logged"
        if cfg.tracking.log_model:
            model_uri = tracking.log_model(model, data.x_test[:2].numpy())
            model_note = f"model {model_uri}"
            if cfg.tracking.register:
                version, champion = tracking.register_model(model_uri, cfg.model.arch, history.best_val_accuracy)
                model_note += f"  registered fmnist-{cfg.model.arch} v{version}" + " (champion)" * champion
        print(f"test accuracy {metrics['test_accuracy']:.4f}  macro F1 {metrics['test_macro_f1']:.4f}  "
              f"best epoch {history.best_epoch}  {history.seconds:.0f}s  run {run.info.run_id}  {model_note}",
              flush=True)
        return run.info.run_id


def run_trial(cfg: Config, data: Dataset, parent_run_id: str, callback: Callback, tags: dict[str, str],
              started: Callable[[str], None]) -> History:
    """One configuration of a search as a nested run: per-epoch validation only, no test set, no model.

    `started` gets the run's id first thing. `callback` may raise train.Pruned after any epoch; the run then
    ends FINISHED and tagged as pruned.
    """
    model, runtime = build(cfg, data)
    with tracking.tracked_run(cfg.tracking.experiment, cfg.tracking.run_name, parent_run_id, tags=tags) as run:
        started(run.info.run_id)
        tracking.log_setup(cfg, data, runtime.describe(), *count_params(model), inputs=False)
        _, _, history = train(model, data, cfg, runtime, [tracking.EpochLogger(), callback])
        tracking.log_trial_result(history.best_val_accuracy, history.seconds, history.best_epoch)
    return history


def build(cfg: Config, data: Dataset) -> tuple[torch.nn.Module, Runtime]:
    torch.manual_seed(cfg.train.seed)  # the initial weights too: the same seed gives the same run
    model = build_model(cfg.model.arch, **cfg.model.params)
    runtime = resolve_runtime(cfg.train, model)
    n_params, n_trained = count_params(model)
    print(f"{cfg.model.arch}: {n_params:,} parameters ({n_trained:,} trained) on {runtime.describe()}; data "
          f"{data.source} (train {len(data.y_train)}, validation {len(data.y_val)}, test {len(data.y_test)})",
          flush=True)
    return model, runtime


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def train(model: torch.nn.Module, data: Dataset, cfg: Config, runtime: Runtime, callbacks: list[Callback]):
    """Fit the model; returns (the module that maps test inputs to logits, those test inputs, the history)."""
    trained, train_data, train_cfg = model, data, cfg.train
    if isinstance(model, TransferNet) and model.cut > 0:
        # The frozen part's output never changes: compute (or read) it once, then train only the rest on it.
        # The one augmentation that survives caching is a flipped copy of the training set.
        features = frozen_features(model, data, runtime, flip=cfg.train.augment, batch_size=cfg.train.eval_batch_size)
        tracking.log_feature_extraction(features.seconds, features.cache_hit)
        print(f"frozen {model.cut} of {len(model.stages)} stages: activations "
              f"{tuple(features.data.x_train.shape)} in {features.seconds:.0f}s "
              f"({'from the cache' if features.cache_hit else 'computed'})", flush=True)
        trained, train_data = model.trained_part(), features.data
        train_cfg = dataclasses.replace(cfg.train, augment=False)
    history = fit(trained, train_data, train_cfg, callbacks=callbacks)
    return trained, train_data.x_test, history


def run_study(archs: list[str], overrides: list[str], experiment: str, out_dir: Path) -> tuple[str, str]:
    """The whole study in one parent run: each architecture as a nested run, then the comparison of exactly those.

    Every configuration is validated before the first run starts. Returns (the comparison's Markdown, parent id).
    """
    from fmnist.compare import compare

    configs = [load_config(arch, None, overrides) for arch in archs]
    for cfg in configs:
        cfg.tracking.run_name = cfg.tracking.run_name or cfg.model.arch
    experiment = tracking.current_experiment(experiment)
    with tracking.tracked_run(experiment, "study") as parent:
        tracking.tag_study(archs)
        for cfg in configs:
            run_experiment(cfg, parent.info.run_id)
        markdown, _ = compare(experiment, tracking.study_filter(parent.info.run_id), out_dir=out_dir,
                              parent_run_id=parent.info.run_id)
        return markdown, parent.info.run_id
