import pytest
import torch

from fmnist import data as fdata
from fmnist.config import TrainConfig
from fmnist.models import build_model
from fmnist.train import augment, fit, resolve_runtime


def small_cfg(**kw) -> TrainConfig:
    return TrainConfig(**({"epochs": 3, "batch_size": 64, "lr": 3e-3, "threads": 2} | kw))


def test_augment_shifts_and_flips_without_changing_shape_or_dtype():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 28, 28, dtype=torch.uint8)
    x[:, 14, 14] = 255  # one bright pixel at the centre
    out = augment(x, g, shift=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    ys, xs = (out == 255).nonzero()[:, 1:].T
    assert (out == 255).sum(dim=(1, 2)).eq(1).all()  # the pixel survives, exactly once
    assert ys.sub(14).abs().max() <= 2 and len(set(ys.tolist())) > 1  # moved by up to 2 rows, not always 0
    no_shift = augment(x, g, shift=0)
    flipped = no_shift[:, 14, 13] == 255  # a flip of column 14 lands at column 13
    assert 10 < flipped.sum() < 54  # about half are flipped


def test_fit_learns_tiny_data_and_restores_the_best_epoch(tiny_data):
    data = fdata.load(tiny_data, 0.2, seed=0)
    calls = []

    class Recorder:
        def on_epoch_end(self, epoch, metrics):
            calls.append((epoch, metrics))

    model = build_model("cnn", widths=(8, 16), convs_per_block=1)
    history = fit(model, data, small_cfg(epochs=4, batch_size=32, augment=True), callbacks=[Recorder()])
    assert [e for e, _ in calls] == [1, 2, 3, 4]
    assert set(calls[0][1]) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}
    assert history.best_val_accuracy == max(m["val_accuracy"] for _, m in calls) > 0.5  # chance is 0.1
    assert history.epochs[history.best_epoch - 1]["val_accuracy"] == history.best_val_accuracy


def test_early_stopping_stops_after_patience(tiny_data):
    data = fdata.load(tiny_data, 0.2, seed=0)
    history = fit(build_model("ann", widths=(16,)), data, small_cfg(epochs=30, lr=1e-6, patience=2))
    assert history.stopped_early and len(history.epochs) == history.best_epoch + 2 < 30


@pytest.mark.parametrize("arch", ["ann", "cnn"])
def test_same_seed_same_metrics_other_seed_other_metrics(tiny_data, arch):
    data = fdata.load(tiny_data, 0.2, seed=0)
    params = {"widths": (8, 16), "convs_per_block": 1} if arch == "cnn" else {"widths": (32,)}

    def run(seed):
        torch.manual_seed(123)  # fit must not depend on the global RNG state left by others
        return fit(build_model(arch, **params), data, small_cfg(epochs=2, seed=seed, augment=True)).epochs

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other


def test_runtime_uses_bf16_only_where_asked_or_native():
    model = build_model("cnn", widths=(4,), convs_per_block=1)
    assert resolve_runtime(TrainConfig(precision="fp32", device="cpu"), model).autocast is None
    rt = resolve_runtime(TrainConfig(precision="bf16", device="cpu"), model)
    assert rt.autocast is torch.bfloat16 and rt.channels_last
    assert not resolve_runtime(TrainConfig(precision="bf16", device="cpu"), build_model("ann")).channels_last
