"""Transfer learning speed on the CPU, side by side in one process, on real Fashion-MNIST images.

1. Feature extraction (the frozen part of the shipped configuration, experiments/transfer.yaml) in images/s:
   plain fp32 NCHW, then bf16 autocast + channels_last (where the CPU has native bf16), then that plus batch
   norm folded into the convolutions, which is what fmnist ships.
2. A `finetune` epoch: training the unfrozen stages on cached activations vs running the frozen part on every
   batch (what training without the cache costs), extrapolated from timed steps to one epoch of the training set.
Usage: python benchmarks/transfer.py [--images N] [--steps N] [model.unfrozen_blocks=3 ...]
"""
from __future__ import annotations

import argparse
import time

import torch

from fmnist import data as fdata
from fmnist.config import TrainConfig, load_config
from fmnist.errors import reported
from fmnist.features import extract
from fmnist.models import build_model
from fmnist.models.layers import fold_batchnorm
from fmnist.train import Runtime, resolve_runtime, train_step


def extraction_rate(frozen, images: torch.Tensor, rt: Runtime, batch: int) -> float:
    extract(frozen, images[:batch], rt, batch, "warm-up")
    start = time.perf_counter()
    extract(frozen, images, rt, batch, "extract")
    return len(images) / (time.perf_counter() - start)


def step_seconds(trained, inputs: torch.Tensor, labels: torch.Tensor, rt: Runtime, steps: int, batch: int,
                 before=None) -> float:
    """Seconds per optimizer step of `trained`, with `before` (the frozen part) run on each batch when given."""
    trained.train().to(memory_format=rt.memory_format)
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler(enabled=False)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            start = time.perf_counter()
        j = (i * batch) % (len(labels) - batch)
        xb, yb = inputs[j:j + batch], labels[j:j + batch]
        if before is not None:
            with torch.no_grad(), rt.autocast_ctx():
                xb = before(xb)
        train_step(trained, xb, yb, opt, scaler, rt, label_smoothing=0.0)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048, help="images to extract per measurement")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per epoch measurement")
    ap.add_argument("overrides", nargs="*", help="section.key=value on top of experiments/transfer.yaml")
    args = ap.parse_args()
    cfg = load_config("transfer", overrides=args.overrides)
    data = fdata.load(cfg.data.data_dir)
    torch.manual_seed(0)
    model = build_model("transfer", **cfg.model.params)
    shipped = resolve_runtime(cfg.train, model)
    fp32 = resolve_runtime(TrainConfig(device=shipped.device.type, precision="fp32"), model)
    fp32.channels_last = False
    images, batch = data.x_train[:args.images], cfg.train.batch_size

    frozen, eval_batch = model.frozen_part(), cfg.train.eval_batch_size
    rows = [("fp32 NCHW", extraction_rate(frozen, images, fp32, eval_batch)),
            (shipped.describe(), extraction_rate(frozen, images, shipped, eval_batch)),
            (f"{shipped.describe()}, batch norm folded (shipped)",
             extraction_rate(fold_batchnorm(frozen), images, shipped, eval_batch))]
    print(f"\nfeature extraction, {cfg.model.params}, frozen {model.cut} of {len(model.stages)} stages, "
          f"batch {eval_batch}:\n| runtime | images/s | vs fp32 NCHW |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} | {rate / rows[0][1]:.2f}x |", flush=True)
    fast = rows[-1][1]

    labels = data.y_train[:len(images)]
    cached_inputs = extract(model.frozen_part(), images, shipped, cfg.train.eval_batch_size, "cache")
    with_cache = step_seconds(model.trained_part(), cached_inputs, labels, shipped, args.steps, batch)
    model.train()  # keeps the frozen part in eval mode
    without = step_seconds(model.trained_part(), images, labels, shipped, args.steps, batch,
                           before=model.frozen_part())
    n = len(data.y_train) * (2 if cfg.train.augment else 1)  # augment: a flipped copy of the training set
    per_epoch = n // batch
    print(f"\nfinetune epoch ({n} images, batch {batch}, {shipped.describe()}):")
    print("| activations | s/epoch | images/s |\n|---|---|---|")
    for name, s in (("computed every batch", without), ("cached", with_cache)):
        print(f"| {name} | {s * per_epoch:.0f} | {batch / s:.0f} |")
    print(f"speed-up {without / with_cache:.2f}x per epoch; the cache costs one extraction of "
          f"{n / fast:.0f} s for the training images", flush=True)


if __name__ == "__main__":
    with reported("transfer.py"):
        main()
