"""The model registry on the real test server: every run registers, `champion` moves only on improvement, and
the champion classifies raw images and files by its alias."""
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from mlflow.exceptions import MlflowException

from conftest import synthetic
from fmnist.config import load_config
from fmnist.data import CLASSES
from fmnist.errors import ConfigError
from fmnist.pipeline import run_experiment
from fmnist.tracking import MLflowTracker
from fmnist.tracking.registry import register_model


def train(arch, tiny_data, experiment, *overrides):
    cfg = load_config(arch, overrides=[f"data.data_dir={tiny_data}", *overrides])
    return run_experiment(cfg, MLflowTracker(experiment)).run_id

pytestmark = pytest.mark.slow


def test_training_registers_and_champion_moves_only_on_better_validation(tiny_data, tmp_path, monkeypatch):
    # A store of its own: on the shared server, another test's better fmnist-ann version would hold the title.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'registry.db'}")
    monkeypatch.chdir(tmp_path)  # and its artifacts
    mlflow.set_tracking_uri(None)
    run = MlflowClient().get_run(train("ann", tiny_data, "registry", "train.epochs=1", "model.widths=[16]"))
    client = MlflowClient()
    [first] = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert first.name == "fmnist-ann"
    assert client.get_model_version_by_alias("fmnist-ann", "champion").version == first.version
    val = run.data.metrics["best_val_accuracy"]

    model_uri = f"models:/fmnist-ann/{first.version}"
    worse, moved = register_model(model_uri, "ann", val - 0.01)
    assert not moved and client.get_model_version_by_alias("fmnist-ann", "champion").version == first.version
    tie, moved = register_model(model_uri, "ann", val)
    assert not moved  # only a strictly better validation accuracy takes the title
    better, moved = register_model(model_uri, "ann", val + 0.01)
    assert moved and str(client.get_model_version_by_alias("fmnist-ann", "champion").version) == better


def predict(*args):
    return subprocess.run([sys.executable, "-m", "fmnist", "predict", *args], capture_output=True, text=True,
                          timeout=120)


def test_champion_loads_by_alias_and_predicts_files(tracking_env, tiny_data, tmp_path):
    train("cnn", tiny_data, "predict", "train.epochs=4", "model.widths=[8,16]")
    images, labels = synthetic(6, seed=7)  # the learnable classes of the tiny set
    model = mlflow.pyfunc.load_model("models:/fmnist-cnn@champion")
    table = model.predict(images)
    assert list(table.columns) == ["class", "probability", *CLASSES]
    assert (table["class"] == [CLASSES[k] for k in labels]).mean() >= 0.5  # chance is 0.1
    with pytest.raises(MlflowException, match=r"dtype float64 \(0-1 floats\?"):
        model.predict(images / 255.0)

    Image.fromarray(images[0]).save(tmp_path / "one.png")
    np.save(tmp_path / "batch.npy", images[1:])
    out = predict("--model", "models:/fmnist-cnn@champion", str(tmp_path / "one.png"), str(tmp_path / "batch.npy"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith(str(tmp_path / "one.png"))
    assert lines[0].split()[1:-1] == table["class"][0].split()  # the same answer as the pyfunc
    assert float(lines[0].split()[-1]) == pytest.approx(table["probability"][0], abs=5e-4)

    np.save(tmp_path / "floats.npy", images / 255.0)
    out = predict("--model", "models:/fmnist-cnn@champion", str(tmp_path / "floats.npy"))
    assert out.returncode == 2 and f"{tmp_path / 'floats.npy'}: dtype float64 (0-1 floats?" in out.stderr
    out = predict("--model", "models:/fmnist-nope@champion", str(tmp_path / "one.png"))
    assert out.returncode == 2 and "--model models:/fmnist-nope@champion: cannot load it" in out.stderr


def test_an_ann_distils_from_the_registered_cnn_and_a_missing_teacher_leaves_no_run(tiny_data, tmp_path, monkeypatch):
    # A store of its own: this weak CNN must not become the shared server's champion for other tests.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'distil.db'}")
    monkeypatch.chdir(tmp_path)  # and its artifacts
    mlflow.set_tracking_uri(None)
    train("cnn", tiny_data, "distil", "train.epochs=2", "model.widths=[8,16]", "model.convs_per_block=1")
    teacher = "models:/fmnist-cnn@champion"
    champion = MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")
    run = MlflowClient().get_run(train("ann", tiny_data, "distil", "train.epochs=2", "model.widths=[16]",
                                       f"train.teacher={teacher}"))
    assert run.info.status == "FINISHED" and run.data.params["train.teacher"] == teacher
    assert run.data.tags["teacher_run_id"] == champion.run_id  # which model taught, though the alias moves on
    assert run.data.metrics["test_accuracy"] > 0.3  # chance is 0.1
    experiment = run.info.experiment_id
    before = len(MlflowClient().search_runs([experiment]))
    with pytest.raises(ConfigError, match="train.teacher=models:/fmnist-nope@champion: cannot load it from"):
        train("ann", tiny_data, "distil", "train.teacher=models:/fmnist-nope@champion")
    assert len(MlflowClient().search_runs([experiment])) == before
