"""One tracked experiment end to end: data -> model -> fit -> test evaluation -> MLflow run."""
from __future__ import annotations

import tempfile
from pathlib import Path

from fmnist import data as fdata
from fmnist import tracking
from fmnist.config import Config
from fmnist.evaluate import write_report
from fmnist.models import build_model
from fmnist.train import fit, predict_logits, resolve_runtime


def run_experiment(cfg: Config) -> str:
    """Train and evaluate one configuration, logging everything to one MLflow run; returns the run id.

    Data and model are built before the run starts, so a bad dataset or option leaves no run behind.
    """
    data = fdata.load(cfg.data.data_dir, cfg.data.val_fraction, cfg.train.seed)
    model = build_model(cfg.model.arch, **cfg.model.params)
    runtime = resolve_runtime(cfg.train, model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model.arch}: {n_params:,} parameters on {runtime.describe()}; data {data.source} "
          f"(train {len(data.y_train)}, validation {len(data.y_val)}, test {len(data.y_test)})", flush=True)

    with tracking.tracked_run(cfg) as run:
        tracking.log_setup(cfg, data, runtime.describe(), n_params)
        history = fit(model, data, cfg.train, callbacks=[tracking.EpochLogger()])
        y_pred = predict_logits(model, data.x_test, runtime, cfg.train.eval_batch_size).argmax(1).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            metrics = write_report(Path(tmp), data.x_test.numpy(), data.y_test.numpy(), y_pred, data.classes,
                                   history.epochs)
            tracking.log_results(metrics | {"best_val_accuracy": history.best_val_accuracy}, Path(tmp),
                                 history.seconds, history.best_epoch)
        model_uri = tracking.log_model(model, data.x_test[:2].numpy()) if cfg.tracking.log_model else "not logged"
        print(f"test accuracy {metrics['test_accuracy']:.4f}  macro F1 {metrics['test_macro_f1']:.4f}  "
              f"best epoch {history.best_epoch}  {history.seconds:.0f}s  run {run.info.run_id}  model {model_uri}",
              flush=True)
        return run.info.run_id
