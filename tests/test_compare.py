"""`fmnist compare` against the real test server: selection by validation, tables, artifacts, the comparison run,
and the comparison rebuilt from MLflow alone."""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from fmnist.compare import build
from fmnist.data import CLASSES
from fmnist.evaluate import predictions_table, slug

pytestmark = pytest.mark.slow


def log_run(client, experiment_id, arch, val, test, status="FINISHED", seed=0, **tags):
    """A finished run as a training run logs it: metrics and the evaluation files the comparison reads (a model
    right on the first `test` share of 1,000 test images)."""
    run = client.create_run(experiment_id, tags={"architecture": arch, **tags})
    metrics = {"best_val_accuracy": val, "test_accuracy": test, "test_macro_f1": test - 0.001, "test_ece": 0.05,
               "test_macro_precision": test, "test_macro_recall": test, "params_count": 1000, "train_seconds": 60}
    metrics |= {f"test_f1_{slug(c)}": test - 0.01 * i for i, c in enumerate(CLASSES)}
    for name, value in metrics.items():
        client.log_metric(run.info.run_id, name, value)
    client.log_param(run.info.run_id, "train.seed", seed)
    labels = np.arange(1000) % 10
    predicted = np.where(np.arange(1000) < round(1000 * test), labels, (labels + 1) % 10)
    probabilities = np.full((1000, 10), 0.02)
    probabilities[np.arange(1000), predicted] = 0.82
    with tempfile.TemporaryDirectory() as tmp:
        predictions_table(probabilities, labels, CLASSES).to_parquet(Path(tmp) / "predictions.parquet")
        pd.DataFrame({"index": range(500), "label": labels[:500], "predicted": labels[:500]}).to_parquet(
            Path(tmp) / "train_predictions.parquet")
        pd.DataFrame({"epoch": [1, 2], "val_accuracy": [0.5, val], "elapsed_seconds": [30.0, 60.0]}).to_csv(
            Path(tmp) / "history.csv", index=False)
        client.log_artifacts(run.info.run_id, tmp, "evaluation")
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_compare_selects_by_validation_and_logs_a_linked_comparison_run(tracking_env, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("compare-select")
    best_val = {arch: log_run(client, exp, arch, val=0.90 + i / 100, test=0.88 + i / 100)
                for i, arch in enumerate(("ann", "cnn", "transfer"))}
    # Better on the test set but worse on validation: must not be chosen.
    log_run(client, exp, "cnn", val=0.85, test=0.99)
    log_run(client, exp, "transfer", val=0.99, test=0.99, status="FAILED")  # unfinished runs don't count
    out = subprocess.run([sys.executable, "-m", "fmnist", "compare", "--experiment", "compare-select",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0.8900" in out.stdout and "0.9900" not in out.stdout  # cnn's chosen run: test 0.89
    models = pd.read_csv(tmp_path / "comparison.csv", index_col="model")
    assert list(models.index) == ["ann", "cnn", "transfer"]
    assert models.loc["cnn", "test_accuracy"] == pytest.approx(0.89)  # from the predictions, as logged
    pairs = pd.read_csv(tmp_path / "pairs.csv", index_col="pair")
    assert pairs.loc["cnn vs ann", "difference"] == pytest.approx(0.01) and pairs.loc["cnn vs ann", "p_value"] < 0.05
    per_class = (tmp_path / "per_class_f1.csv").read_text()
    assert "cnn - ann (points)" in per_class and "transfer - cnn (points)" in per_class
    assert {p.name for p in tmp_path.iterdir()} >= {"comparison.md", "report.html", "pairs.csv", "verdicts.md",
                                                    "per_class_f1.png", "convergence.png", "reliability.png"}
    assert "**CNN beats ANN**: supported" in out.stdout

    [comparison] = client.search_runs([exp], "tags.`fmnist.kind` = 'comparison'")
    assert comparison.info.status == "FINISHED"
    assert {k: v for k, v in comparison.data.tags.items() if k.startswith("compared.")} == \
        {f"compared.{arch}": run_id for arch, run_id in best_val.items()}
    artifacts = {a.path for a in client.list_artifacts(comparison.info.run_id, "comparison")}
    assert {"comparison/comparison.md", "comparison/report.html", "comparison/pairs.csv"} <= artifacts
    assert comparison.data.metrics["cnn_test_accuracy"] == pytest.approx(0.89)

    # Rebuilt from MLflow alone, in this process: the same numbers as the logged comparison.
    rebuilt = build("compare-select")
    logged = pd.read_csv(client.download_artifacts(comparison.info.run_id, "comparison/pairs.csv", str(tmp_path)),
                         dtype={"per_seed_difference": str})
    pd.testing.assert_frame_equal(rebuilt.pairs.reset_index(drop=True), logged, check_dtype=False)


def test_compare_filter_and_refusals(tracking_env, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("compare-filter")
    log_run(client, exp, "ann", val=0.9, test=0.8, study="a")
    log_run(client, exp, "cnn", val=0.9, test=0.9, study="b")

    def compare(*args):
        return subprocess.run([sys.executable, "-m", "fmnist", "compare", "--experiment", "compare-filter",
                               "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=120)

    out = compare("--filter", "tags.study = 'b'")
    assert out.returncode == 0 and "cnn" in out.stdout and "ann" not in out.stdout.split("class")[0]
    out = compare("--select", "test_accuracy")
    assert out.returncode == 2 and "leaks the test set" in out.stderr
    out = compare("--filter", "tags.study = 'nope'")
    assert out.returncode == 2 and "no finished training runs" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fmnist", "compare", "--experiment", "does-not-exist"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "does-not-exist: no such MLflow experiment" in out.stderr


def test_several_runs_per_architecture_and_seed_are_chosen_by_validation_and_paired_by_seed(tracking_env, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("compare-seeds")
    for seed in (0, 1):
        log_run(client, exp, "ann", val=0.80, test=0.80, seed=seed)
        log_run(client, exp, "cnn", val=0.90, test=0.90 + seed / 100, seed=seed)
        log_run(client, exp, "cnn", val=0.85, test=0.99, seed=seed)  # better on test, worse on validation
        taught = log_run(client, exp, "ann", val=0.95, test=0.95, seed=seed)  # distilled from a CNN: not the ANN's
        client.log_param(taught, "train.teacher", "models:/fmnist-cnn@champion")
        client.log_param(log_run(client, exp, "ann", val=0.70, test=0.70, seed=seed), "train.teacher", "")
    comparison = build("compare-seeds")
    assert comparison.models.loc["ann", "test_accuracy"] == pytest.approx(0.80)  # the runs taught by labels alone
    assert comparison.models.loc["cnn", "seeds"] == 2
    assert comparison.models.loc["cnn", "test_accuracy"] == pytest.approx(0.905)  # mean of 0.90 and 0.91
    assert comparison.models.loc["cnn", "test_accuracy_std"] == pytest.approx(np.std([0.90, 0.91], ddof=1))
    assert comparison.pairs.loc[0, "per_seed_difference"] == "+0.1000 +0.1100"
