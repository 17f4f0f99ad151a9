"""How long `fmnist compare` takes over an experiment of many runs (target: 100 runs in under 10 s).

Fills a fresh tracking store with N finished training runs that carry every metric and evaluation file a real run
logs (10,000 test predictions, 54,000 training predictions, the history), then times the whole comparison: the
search, the downloads, the bootstrap intervals and tests, the report with its charts and the logged comparison run.

    python benchmarks/compare.py [--runs 100] [--tracking-uri URI]   # default: a fresh sqlite store in a temp dir
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

import pandas as pd

from fmnist.compare import compare
from fmnist.config import load_config
from fmnist.data import CLASSES
from fmnist.errors import reported
from fmnist.evaluate import predictions_table, slug
from fmnist.tracking import MLflowTracker


def fill(client: MlflowClient, experiment_id: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    now = int(time.time() * 1000)
    for i in range(n):
        arch = ("ann", "cnn", "transfer")[i % 3]
        run = client.create_run(experiment_id, tags={"architecture": arch}, run_name=f"{arch}-{i}")
        base = {"ann": 0.90, "cnn": 0.93, "transfer": 0.92}[arch] + rng.normal(0, 0.005)
        metrics = {"best_val_accuracy": base + 0.002, "test_accuracy": base, "test_macro_f1": base,
                   "test_macro_precision": base, "test_macro_recall": base, "params_count": 1e6,
                   "train_seconds": 100, "best_epoch": 10}
        for c in CLASSES:
            metrics |= {f"test_{m}_{slug(c)}": base + rng.normal(0, 0.02) for m in ("f1", "precision", "recall")}
        history = [Metric("val_accuracy", base - 0.1 / e, now, e) for e in range(1, 17)]
        params = [Param(k, str(v)) for k, v in load_config(arch).flat().items()]
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()] + history,
                         params=params, tags=[RunTag("device", "cpu")])
        log_evaluation(client, run.info.run_id, base, rng)
        client.set_terminated(run.info.run_id, "FINISHED")


def log_evaluation(client: MlflowClient, run_id: str, accuracy: float, rng) -> None:
    labels = np.repeat(np.arange(10), 1000)
    predicted = np.where(rng.random(10_000) < accuracy, labels, rng.integers(0, 10, 10_000))
    probabilities = rng.dirichlet(np.ones(10) * 0.1, 10_000)
    probabilities[np.arange(10_000), predicted] += 1
    probabilities /= probabilities.sum(1, keepdims=True)
    train = np.repeat(np.arange(10), 5400)
    with tempfile.TemporaryDirectory() as tmp:
        predictions_table(probabilities, labels, CLASSES).to_parquet(Path(tmp) / "predictions.parquet", index=False)
        pd.DataFrame({"index": np.arange(len(train)), "label": train, "predicted": np.where(
            rng.random(len(train)) < accuracy + 0.03, train, 0)}).to_parquet(Path(tmp) / "train_predictions.parquet")
        pd.DataFrame({"epoch": range(1, 17), "val_accuracy": [accuracy - 0.1 / e for e in range(1, 17)],
                      "elapsed_seconds": [30.0 * e for e in range(1, 17)]}).to_csv(Path(tmp) / "history.csv",
                                                                                   index=False)
        client.log_artifacts(run_id, tmp, "evaluation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--tracking-uri", help="default: a fresh sqlite store in a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.tracking_uri or f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        name = f"bench-compare-{int(time.time())}"
        local = None if args.tracking_uri else str(Path(tmp) / "artifacts")  # a server picks its own
        experiment_id = client.create_experiment(name, artifact_location=local)
        start = time.perf_counter()
        fill(client, experiment_id, args.runs)
        print(f"filled {args.runs} runs in {time.perf_counter() - start:.1f}s ({uri})")
        start = time.perf_counter()
        compare(name, MLflowTracker(name), out_dir=Path(tmp) / "report")
        in_process = time.perf_counter() - start
        start = time.perf_counter()  # what a user waits for: a fresh process, imports included
        subprocess.run([sys.executable, "-m", "fmnist", "compare", "--experiment", name, "--out",
                        str(Path(tmp) / "report-cli")], check=True, capture_output=True)
        command = time.perf_counter() - start
    print(f"compare over {args.runs} runs: {in_process:.2f} s in process, {command:.2f} s as `fmnist compare` "
          "(target: under 10 s for 100 runs)")


if __name__ == "__main__":
    with reported("compare.py"):
        main()
