"""Training images/s: this project's pipeline vs the same model fed by torchvision's usual input pipeline.

Measured side by side in one process on the real data, same model, same batch size:
  tutorial     torchvision FashionMNIST + ToTensor (+ RandomCrop/RandomHorizontalFlip for cnn) + DataLoader, fp32,
               torch's default AdamW
  tutorial+rt  the same DataLoader, with this project's runtime (bf16 autocast, channels_last where they pay) and
               optimizer (fused AdamW)
  fmnist       fmnist.train: batches sliced from one in-memory uint8 tensor, augmentation on the batch tensor,
               and the same runtime and optimizer
Usage: python benchmarks/throughput.py [--steps N] [--arch ann cnn]
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from fmnist import data as fdata
from fmnist.config import TrainConfig, load_config
from fmnist.errors import reported
from fmnist.models import build_model
from fmnist.train import Runtime, augment, make_optimizer, resolve_runtime, train_step


def timed(batches, model, rt: Runtime, steps: int, ours: bool, warmup: int = 5) -> float:
    """Images/s over `steps` optimizer steps, input pipeline included, after `warmup` steps."""
    model.train()
    model.to(memory_format=rt.memory_format)
    opt = make_optimizer(model, TrainConfig(lr=1e-3)) if ours else torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(enabled=False)
    seen, it = 0, iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        x, y = next(it)
        train_step(model, x, y, opt, scaler, rt, label_smoothing=0.1)  # the training loop's own step
        seen += len(y)
    return seen / (time.perf_counter() - start)


def torchvision_batches(root: Path, batch: int, augmented: bool):
    tf = [transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip()] if augmented else []
    ds = datasets.FashionMNIST(str(root), train=True, download=False, transform=transforms.Compose(
        tf + [transforms.ToTensor(), transforms.Lambda(lambda t: t * 255)]))  # the model takes 0-255 pixels
    while True:
        yield from DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)


def fmnist_batches(x: torch.Tensor, y: torch.Tensor, batch: int, augmented: bool):
    g = torch.Generator().manual_seed(0)
    while True:
        order = torch.randperm(len(y), generator=g)
        for i in range(len(y) // batch):
            idx = order[i * batch:(i + 1) * batch]
            xb = x[idx]
            yield (augment(xb, g) if augmented else xb), y[idx]


def torchvision_root(source: Path, tmp: Path) -> Path:
    """torchvision expects <root>/FashionMNIST/raw with the decompressed files."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (n for pair in fdata.FILES.values() for n in pair):
        src = fdata.find_file(source, name)
        with (gzip.open if src.suffix == ".gz" else open)(src, "rb") as f, open(raw / name, "wb") as out:
            shutil.copyfileobj(f, out)
    return tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["ann", "cnn"])
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per measurement (default: ann 150, cnn 40)")
    args = ap.parse_args()
    data = fdata.load()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(Path(data.source), Path(tmp))
        for arch in args.arch:
            cfg = load_config(arch)
            steps = args.steps or {"ann": 150}.get(arch, 40)
            batch, aug = cfg.train.batch_size, cfg.train.augment
            model = build_model(arch, **cfg.model.params)
            fp32 = resolve_runtime(TrainConfig(device="cpu", precision="fp32"), model)
            ours = resolve_runtime(cfg.train, model)
            tutorial = timed(torchvision_batches(root, batch, aug), model, fp32, steps, ours=False)
            tutorial_rt = timed(torchvision_batches(root, batch, aug), model, ours, steps, ours=True)
            fast = timed(fmnist_batches(data.x_train, data.y_train, batch, aug), model, ours, steps, ours=True)
            rows.append((arch, batch, aug, ours.describe(), tutorial, tutorial_rt, fast))
            print(f"{arch}: tutorial {tutorial:.0f}, tutorial+rt {tutorial_rt:.0f}, fmnist {fast:.0f} images/s",
                  flush=True)
    print("\n| arch | batch | augment | fmnist runtime | tutorial img/s | tutorial+runtime img/s | fmnist img/s "
          "| fmnist / tutorial | fmnist / tutorial+runtime |\n|---|---|---|---|---|---|---|---|---|")
    for arch, batch, aug, rt, a, b, c in rows:
        print(f"| {arch} | {batch} | {aug} | {rt} | {a:.0f} | {b:.0f} | {c:.0f} | {c / a:.2f}x | {c / b:.2f}x |")


if __name__ == "__main__":
    with reported("throughput.py"):
        main()
