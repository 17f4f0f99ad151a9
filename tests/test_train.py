import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fmnist import data as fdata
from fmnist.config import TrainConfig
from fmnist.errors import Diverged
from fmnist.models import build_model
from fmnist.predict import export_network
from fmnist.train import (augment, distill_target, erase, fit, make_optimizer, make_scheduler, resolve_runtime,
                          validate)


def small_cfg(**kw) -> TrainConfig:
    return TrainConfig(**({"epochs": 3, "batch_size": 64, "lr": 3e-3, "threads": 2} | kw))


def train(model, data, cfg, callbacks=()):
    return fit(model, data, cfg, resolve_runtime(cfg, model), callbacks)


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


def test_random_erasing_blanks_one_rectangle_per_chosen_image():
    g = torch.Generator().manual_seed(0)
    x = torch.full((2000, 28, 28), 200, dtype=torch.uint8)
    out = erase(x, g, p=0.5)
    erased = (out == 0).flatten(1).sum(1)
    assert out.dtype == torch.uint8 and set(out.unique().tolist()) <= {0, 200}
    assert 0.45 < (erased > 0).float().mean() < 0.55  # about half the images
    share = erased[erased > 0].float() / 784
    assert share.min() >= 0.005 and share.max() <= 0.25  # 2-20 % of the area, give or take the rounding
    for image in out[erased > 0][:50]:  # one solid rectangle: its bounding box is all zeros
        rows, cols = (image == 0).nonzero().T
        assert (image[rows.min():rows.max() + 1, cols.min():cols.max() + 1] == 0).all()
    assert torch.equal(erase(x, torch.Generator().manual_seed(0), p=0.0), x)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_schedules_warm_up_to_the_peak_then_anneal_to_zero(schedule):
    # 20 steps, warmup 0.25: cosine rises linearly over 5 steps (0.2, 0.4, ..., 1.0 of the peak lr), then falls as
    # (1 + cos(pi * k / 15)) / 2 over the remaining 15: k = 5 gives 0.75, k = 15 gives 0.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt, TrainConfig(lr=0.1, schedule=schedule, warmup=0.25), total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = max(range(20), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(0.1) and peak in (4, 5)
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
    if schedule == "cosine":
        assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
        assert lrs[10] == pytest.approx(0.075) and opt.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)
    one_step = make_scheduler(opt, TrainConfig(lr=0.1, schedule=schedule, warmup=0.25), total_steps=1)
    opt.step()
    one_step.step()  # a run of one step (tiny data, one epoch) must not divide by zero


def test_fit_learns_tiny_data_and_restores_the_best_epoch(tiny_data):
    data = fdata.load(tiny_data, 0.2, seed=0)
    calls, weights = [], {}
    model = build_model("cnn", widths=(8, 16), convs_per_block=1)

    class Recorder:
        def on_epoch_end(self, epoch, metrics):
            calls.append((epoch, metrics))
            weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
            if epoch == 2:  # wreck the weights: the later epochs cannot beat the first two
                with torch.no_grad():
                    for p in model.parameters():
                        p.normal_(0, 10)

    cfg = small_cfg(epochs=4, batch_size=32, augment=True)
    history = train(model, data, cfg, callbacks=[Recorder()])
    assert [e for e, _ in calls] == [1, 2, 3, 4]
    assert set(calls[0][1]) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "elapsed_seconds"}
    assert history.best_val_accuracy == max(m["val_accuracy"] for _, m in calls) > 0.5  # chance is 0.1
    assert history.best_epoch in (1, 2)
    restored = model.state_dict()
    assert all(torch.equal(restored[k].cpu(), v) for k, v in weights[history.best_epoch].items())
    rt = resolve_runtime(cfg, model)
    assert validate(model, data.x_val, data.y_val, rt)["accuracy"] == history.best_val_accuracy


def test_fit_leaves_the_model_in_the_runtime_layout_and_the_export_in_the_standard_one(tiny_data):
    data = fdata.load(tiny_data, 0.2, seed=0)
    model = build_model("cnn", widths=(8, 16))
    cfg = small_cfg(epochs=1, precision="bf16")
    rt = resolve_runtime(cfg, model)
    assert rt.channels_last
    train(model, data, cfg)
    hidden = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert hidden and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                          for w in hidden)  # the training split is scored after fit, in the fast layout
    program = export_network(model, data.x_test[:2].numpy())
    weights = [t for t in program.state_dict.values() if t.dim() == 4]
    assert weights and all(t.is_contiguous() for t in weights)


@pytest.mark.parametrize("optimizer,lr,weight_decay", [("adamw", 3e-3, 0.05), ("sgd", 0.05, 5e-4),
                                                              ("muon", 3e-3, 0.05)])
def test_each_optimizer_learns_tiny_data(tiny_data, optimizer, lr, weight_decay):
    data = fdata.load(tiny_data, 0.2, seed=0)
    cfg = small_cfg(epochs=3, batch_size=32, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
    model = build_model("cnn", widths=(8, 16), convs_per_block=1)
    history = train(model, data, cfg)
    assert history.best_val_accuracy > 0.5  # chance is 0.1
    assert type(make_optimizer(model, cfg)).__name__.lower() == optimizer


def test_muon_takes_the_hidden_weights_and_leaves_the_first_layer_and_classifier_to_its_adam():
    model = build_model("cnn", widths=(8, 16, 32), convs_per_block=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    opt = make_optimizer(model, small_cfg(optimizer="muon"))
    muon, fallback = opt.param_groups
    assert [p.shape for p in muon["params"]] == [convs[1].weight.shape, convs[2].weight.shape]
    assert fallback["use_fallback"] and len(fallback["params"]) == len(list(model.parameters())) - 2


def test_early_stopping_stops_after_patience(tiny_data):
    data = fdata.load(tiny_data, 0.2, seed=0)
    history = train(build_model("ann", widths=(16,)), data, small_cfg(epochs=30, lr=1e-6, patience=2))
    assert len(history.epochs) == history.best_epoch + 2 < 30


def test_a_non_finite_loss_stops_training_at_once_naming_the_epoch(tiny_data):
    data = fdata.load(tiny_data, 0.2, seed=0)
    with pytest.raises(Diverged) as e:
        train(build_model("ann", widths=(16,)), data, small_cfg(epochs=5, lr=1e30, label_smoothing=0))
    assert "in epoch 1" in str(e.value) and "try train.lr=1e+29" in str(e.value)


@pytest.mark.parametrize("arch", ["ann", "cnn"])
def test_same_seed_same_metrics_other_seed_other_metrics(tiny_data, arch):
    data = fdata.load(tiny_data, 0.2, seed=0)
    params = {"widths": (8, 16), "convs_per_block": 1} if arch == "cnn" else {"widths": (32,)}

    def run(seed):
        torch.manual_seed(seed)  # the pipeline seeds the initial weights and dropout once, before building
        epochs = train(build_model(arch, **params), data, small_cfg(epochs=2, seed=seed, augment=True)).epochs
        return [{k: v for k, v in e.items() if k != "elapsed_seconds"} for e in epochs]

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other


def test_runtime_uses_bf16_only_where_asked_or_native():
    model = build_model("cnn", widths=(4,), convs_per_block=1)
    assert resolve_runtime(TrainConfig(precision="fp32", device="cpu"), model).autocast is None
    rt = resolve_runtime(TrainConfig(precision="bf16", device="cpu"), model)
    assert rt.autocast is torch.bfloat16 and rt.channels_last
    assert not resolve_runtime(TrainConfig(precision="bf16", device="cpu"), build_model("ann")).channels_last


def test_the_distillation_target_mixes_label_and_teacher_and_has_hintons_gradient():
    # Label 2, a teacher 0.7 sure of class 5 (0.3 / 9 elsewhere), share 0.5: class 2 gets 0.5 + 0.5 * 0.3 / 9,
    # class 5 0.35, every other class 0.5 * 0.3 / 9.
    teacher = torch.full((1, 10), 0.3 / 9)
    teacher[0, 5] = 0.7
    target = distill_target(torch.tensor([2]), teacher, 0.5)
    rest = 0.5 * 0.3 / 9
    assert target[0].tolist() == pytest.approx([rest, rest, 0.5 + rest, rest, rest, 0.35, rest, rest, rest, rest])
    # At temperature 1 the cross-entropy with the mix has the gradient of (1 - a) CE(label) + a KL(teacher || p).
    logits = torch.randn(1, 10, requires_grad=True)
    F.cross_entropy(logits, target).backward()
    mixed = logits.grad.clone()
    logits.grad = None
    hinton = 0.5 * F.cross_entropy(logits, torch.tensor([2])) + 0.5 * F.kl_div(
        F.log_softmax(logits, 1), teacher, reduction="batchmean")
    hinton.backward()
    assert torch.allclose(mixed, logits.grad, atol=1e-6)


@pytest.mark.parametrize("share,follows_teacher", [(1.0, True), (0.0, False)])
def test_a_student_follows_its_teacher_as_far_as_its_share(tiny_data, share, follows_teacher):
    # A teacher sure that every image is class 3, and validation scored against "3" too: with the whole share the
    # student learns to say 3, with none it learns the labels (the tiny set's 10 classes come in equal numbers).
    data = fdata.load(tiny_data, 0.2, seed=0)
    threes = torch.full_like(data.y_train, 3)
    teacher = fdata.Teacher("always-three", None, F.one_hot(threes, 10).float())
    data = dataclasses.replace(data, teacher=teacher, y_val=torch.full_like(data.y_val, 3))
    history = train(build_model("ann", widths=(32,)), data, small_cfg(epochs=8, distill=share))
    # The last epoch's, not the best: an early, barely trained epoch can say 3 often by chance (0.31 was seen once)
    says_three = history.epochs[-1]["val_accuracy"]
    assert says_three > 0.9 if follows_teacher else says_three < 0.3
