"""`fmnist compare` against the real test server: selection by validation, tables, artifacts, the comparison run."""
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from fmnist.data import CLASSES
from fmnist.evaluate import slug

pytestmark = pytest.mark.slow


def log_run(client, experiment_id, arch, val, test, status="FINISHED", **tags):
    run = client.create_run(experiment_id, tags={"architecture": arch, **tags})
    metrics = {"best_val_accuracy": val, "test_accuracy": test, "test_macro_f1": test - 0.001,
               "test_macro_precision": test, "test_macro_recall": test, "params_count": 1000, "train_seconds": 60}
    metrics |= {f"test_f1_{slug(c)}": test - 0.01 * i for i, c in enumerate(CLASSES)}
    for name, value in metrics.items():
        client.log_metric(run.info.run_id, name, value)
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
    summary = (tmp_path / "comparison.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == ["ann", "cnn", "transfer"]
    cnn = dict(zip(summary[0].split(","), summary[2].split(",")))
    assert float(cnn["test accuracy"]) == pytest.approx(0.89) and float(cnn["vs ANN (points)"]) == pytest.approx(1)
    per_class = (tmp_path / "per_class_f1.csv").read_text()
    assert "cnn - ann (points)" in per_class and "transfer - cnn (points)" in per_class
    assert {p.name for p in tmp_path.iterdir()} >= {"comparison.md", "comparison.html", "per_class_f1.png"}

    [comparison] = client.search_runs([exp], "tags.`fmnist.kind` = 'comparison'")
    assert comparison.info.status == "FINISHED"
    assert {k: v for k, v in comparison.data.tags.items() if k.startswith("compared.")} == \
        {f"compared.{arch}": run_id for arch, run_id in best_val.items()}
    artifacts = {a.path for a in client.list_artifacts(comparison.info.run_id, "comparison")}
    assert "comparison/comparison.md" in artifacts and "comparison/per_class_f1.png" in artifacts


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
