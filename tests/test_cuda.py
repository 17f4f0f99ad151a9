"""The CUDA path (AMP, channels_last, the same pipeline), exercised where a GPU is present and skipped, with the
reason, where none is (as on the reference machine and in CI)."""
import numpy as np
import pytest
import torch

from fmnist.config import load_config
from fmnist.models import build_model
from fmnist.pipeline import NullTracker, build, run_experiment
from fmnist.predict import export_network

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU on this machine; run where one is (the device tool lends one)")


@pytest.mark.parametrize("arch,overrides", [
    ("cnn", ["model.widths=[8,16]"]),
    ("transfer", ["model.resolution=64", "model.mode=full", "train.batch_size=64"]),  # every stage trains
])
def test_the_pipeline_trains_on_cuda_with_amp(arch, overrides, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = load_config(arch, overrides=[f"data.data_dir={tiny_data}", "train.epochs=2", "train.device=cuda", *overrides])
    _, rt = build(cfg)
    assert rt.device.type == "cuda" and rt.autocast in (torch.bfloat16, torch.float16) and rt.channels_last
    tracker = NullTracker(tmp_path)
    outcome = run_experiment(cfg, tracker)
    assert tracker.runs[0].tags["device"].startswith("cuda") and outcome.metrics["test_accuracy"] > 0.2


def test_exporting_a_gpu_model_leaves_it_on_the_gpu():
    model = build_model("cnn", widths=[8, 16]).cuda()
    program = export_network(model, np.zeros((2, 28, 28), np.uint8))
    assert all(p.is_cuda for p in model.parameters())  # the copy moves to the CPU, not the caller's model
    assert not any(t.is_cuda for t in program.state_dict.values())  # the saved program loads without a GPU
