"""End to end against a real `mlflow server` on 127.0.0.1: `mlflow run`, reading the run back, interruption."""
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import ROOT
from fmnist import data as fdata
from fmnist.data import CLASSES

pytestmark = pytest.mark.slow


def finished_runs(experiment: str):
    exp = MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else MlflowClient().search_runs([exp.experiment_id])


def test_mlflow_run_cnn_logs_a_complete_loadable_run(tracking_env, tiny_data):
    cmd = ["mlflow", "run", str(ROOT), "-e", "cnn", "--env-manager", "local", "--experiment-name", "e2e-cnn",
           "-P", "epochs=2", "-P", "batch_size=64", "-P", "widths=[8, 16]", "-P", f"data_dir={tiny_data}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stderr and "interpreted in multiple ways" not in out.stderr, out.stderr[-3000:]
    [run] = finished_runs("e2e-cnn")
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["train.epochs"] == "2" and p["model.widths"] == "8,16" and p["model.arch"] == "cnn"
    assert p["train.augment"] == "True" and p["data.data_dir"] == str(tiny_data)
    assert p["train.lr"] == "0.0031" and p["model.dropout"] == "0.06"  # not given: resolved from their one home
    assert tags["architecture"] == "cnn" and tags["torch_version"] and tags["device"].startswith("cpu")
    note = tags["mlflow.note.content"]  # the run's description in the UI
    assert note.startswith("cnn (widths=8,16 ") and "test accuracy" in note
    for name in ("test_accuracy", "test_macro_f1", "test_macro_precision", "test_macro_recall", "test_ece",
                 "train_eval_accuracy", "generalization_gap", "test_f1_t_shirt_top", "test_f1_ankle_boot",
                 "params_count", "train_seconds", "best_val_accuracy", "system/cpu_utilization_percentage"):
        assert name in m, name
    assert m["test_accuracy"] > 0.3  # 2 tiny epochs on a learnable synthetic set; chance is 0.1
    steps = [x.step for x in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/confusion_matrix.json", "evaluation/curves.png",
            "evaluation/misclassified.png", "evaluation/confusion_matrix_normalized.png",
            "evaluation/predictions.parquet", "evaluation/reliability_diagram.png"} <= artifacts
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"fashion-mnist-train", "fashion-mnist-validation", "fashion-mnist-test"}
    assert inputs["fashion-mnist-test"].dataset.digest.endswith("-test")

    [logged] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    model = mlflow.pyfunc.load_model(logged.model_uri)
    raw = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    table = model.predict(raw)
    assert table.shape == (5, 12) and set(table["class"]) <= set(CLASSES)
    np.testing.assert_allclose(table[list(CLASSES)].sum(axis=1), 1, atol=1e-5)


def test_bad_option_is_refused_before_any_run(tracking_env, tiny_data):
    out = subprocess.run([sys.executable, "-m", "fmnist", "train", "--arch", "cnn", "--experiment", "e2e-bad",
                          "--data-dir", str(tiny_data), "train.lr=-1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "train.lr=-1.0: expected a learning rate > 0" in out.stderr
    assert finished_runs("e2e-bad") == []


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, "KILLED"), (signal.SIGTERM, "KILLED")])
def test_interrupted_training_ends_its_run_killed(tracking_env, tiny_data, sig, status):
    experiment = f"e2e-interrupt-{sig.name}"
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "train", "--arch", "ann", "--experiment", experiment,
                             "--data-dir", str(tiny_data), "train.epochs=100000", "train.batch_size=16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run is logging epochs
        runs = finished_runs(experiment)
        if runs and MlflowClient().get_metric_history(runs[0].info.run_id, "val_accuracy"):
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("training never started logging: " + proc.stdout.read()[-2000:])
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    [run] = finished_runs(experiment)
    assert run.info.status == status
    assert run.info.end_time is not None


def test_mlflow_run_transfer_logs_extraction_and_a_model_that_takes_raw_images(tracking_env, tiny_data, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a cold activation cache
    cmd = ["mlflow", "run", str(ROOT), "-e", "transfer", "--env-manager", "local", "--experiment-name",
           "e2e-transfer", "-P", "epochs=1", "-P", "batch_size=32", "-P", "resolution=32", "-P", "unfrozen_blocks=1",
           "-P", f"data_dir={tiny_data}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    [run] = finished_runs("e2e-transfer")  # cache hits: tests/test_transfer.py and the transfer search test
    assert run.info.status == "FINISHED" and run.data.tags["feature_cache"] == "miss"
    p, m = run.data.params, run.data.metrics
    assert (p["model.backbone"], p["model.mode"], p["model.resolution"], p["model.unfrozen_blocks"]) == \
        ("efficientnet_lite0", "finetune", "32", "1")
    assert p["model.pretrained"] == "True" and p["train.augment"] == "True"
    assert m["feature_seconds"] >= 0 and m["test_accuracy"] > 0.2 and "test_macro_f1" in m
    assert 0 < m["params_trained"] < m["params_count"]  # the frozen part is counted but not trained

    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    model = mlflow.pyfunc.load_model(next(x for x in logged if x.source_run_id == run.info.run_id).model_uri)
    data = fdata.load(tiny_data, 0.1, seed=0)
    table = model.predict(data.x_test.numpy())  # raw uint8 images: the model resizes and normalises itself
    assert (table["class"] == [CLASSES[k] for k in data.y_test]).mean() == m["test_accuracy"]
