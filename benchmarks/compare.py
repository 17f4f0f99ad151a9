"""How long `fmnist compare` takes over an experiment of many runs (target: 100 runs in under 10 s).

Fills a fresh tracking store with N finished training runs that carry every metric a real run logs, then times
the whole comparison: the search, both tables, the four report files, the chart and the logged comparison run.

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

from fmnist.compare import compare
from fmnist.config import load_config
from fmnist.data import CLASSES
from fmnist.evaluate import slug


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
        client.set_terminated(run.info.run_id, "FINISHED")


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
        compare(name, out_dir=Path(tmp) / "report")
        in_process = time.perf_counter() - start
        start = time.perf_counter()  # what a user waits for: a fresh process, imports included
        subprocess.run([sys.executable, "-m", "fmnist", "compare", "--experiment", name, "--out",
                        str(Path(tmp) / "report-cli")], check=True, capture_output=True)
        command = time.perf_counter() - start
    print(f"compare over {args.runs} runs: {in_process:.2f} s in process, {command:.2f} s as `fmnist compare` "
          "(target: under 10 s for 100 runs)")


if __name__ == "__main__":
    main()
