"""The model registry on the real test server: every run registers, `champion` moves only on improvement."""
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from fmnist import tracking
from fmnist.config import load_config
from fmnist.experiment import run_experiment

pytestmark = pytest.mark.slow


def test_training_registers_and_champion_moves_only_on_better_validation(tracking_env, tiny_data):
    cfg = load_config("ann", overrides=["train.epochs=1", "model.widths=[16]", f"data.data_dir={tiny_data}",
                                        "tracking.experiment=registry"])
    run = MlflowClient().get_run(run_experiment(cfg))
    client = MlflowClient()
    [first] = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert first.name == "fmnist-ann"
    assert client.get_model_version_by_alias("fmnist-ann", "champion").version == first.version
    val = run.data.metrics["best_val_accuracy"]

    model_uri = f"models:/fmnist-ann/{first.version}"
    worse, moved = tracking.register_model(model_uri, "ann", val - 0.01)
    assert not moved and client.get_model_version_by_alias("fmnist-ann", "champion").version == first.version
    tie, moved = tracking.register_model(model_uri, "ann", val)
    assert not moved  # only a strictly better validation accuracy takes the title
    better, moved = tracking.register_model(model_uri, "ann", val + 0.01)
    assert moved and client.get_model_version_by_alias("fmnist-ann", "champion").version == better

    model = mlflow.pyfunc.load_model("models:/fmnist-ann@champion")
    logits = np.asarray(model.predict(np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)))
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
