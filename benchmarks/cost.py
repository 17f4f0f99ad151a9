"""Training cost of an architecture's shipped configuration against another (a candidate for the defaults).

The machine's speed drifts by up to 2x over minutes here, so two runs measured apart cannot be compared; this
times both side by side in one process, in alternating rounds of a few optimizer steps each on the real data
(augmented as in training), so a drift hits both. It prints each one's images/s and the ratio of a whole
training run's time (epochs x steps per epoch x time per step; validation not counted).

    python benchmarks/cost.py cnn "model.widths=[32,96,192] train.batch_size=128 train.epochs=13"
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from fmnist import data as fdata
from fmnist.config import load_config
from fmnist.errors import reported
from fmnist.models import build_model
from fmnist.train import epoch_steps, make_optimizer, resolve_runtime, train_step, training_batch


class Candidate:
    def __init__(self, arch: str, overrides: list[str], data: fdata.Dataset):
        self.cfg = load_config(arch, overrides=overrides)
        self.model = build_model(arch, **self.cfg.model.params)
        self.rt = resolve_runtime(self.cfg.train, self.model)
        self.model.to(self.rt.device, memory_format=self.rt.memory_format)
        self.model.train()
        self.opt = make_optimizer(self.model, self.cfg.train)
        self.scaler = torch.amp.GradScaler(enabled=self.rt.autocast is torch.float16)
        self.batch, self.steps_per_epoch = epoch_steps(len(data.y_train), self.cfg.train.batch_size)
        self.x, self.y = data.x_train.to(self.rt.device), data.y_train.to(self.rt.device)
        self.generator = torch.Generator().manual_seed(0)
        self.seconds, self.steps = 0.0, 0

    def run(self, steps: int, timed: bool = True) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(self.y), (self.batch,), generator=self.generator).to(self.rt.device)
            xb = training_batch(self.x, idx, self.cfg.train, self.generator)
            train_step(self.model, xb, self.y[idx], self.opt, self.scaler, self.rt, self.cfg.train.label_smoothing)
        if timed:
            if self.rt.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            self.steps += steps

    def run_seconds(self) -> float:
        """A whole run's training time at the measured speed."""
        return self.cfg.train.epochs * self.steps_per_epoch * self.seconds / self.steps


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch")
    ap.add_argument("against", help="overrides of the configuration to compare with, in one string")
    ap.add_argument("--rounds", type=positive, default=8)
    ap.add_argument("--steps", type=positive, default=10, help="optimizer steps of each per round")
    args = ap.parse_args()
    torch.manual_seed(0)
    with reported("cost.py"):
        data = fdata.load()
        shipped = Candidate(args.arch, [], data)
        other = Candidate(args.arch, shlex.split(args.against), data)
    for c in (shipped, other):
        c.run(3, timed=False)  # warm-up: allocator and oneDNN kernel selection
    for _ in range(args.rounds):
        for c in (shipped, other):
            c.run(args.steps)
    for name, c in (("shipped", shipped), (args.against, other)):
        print(f"{name}: {c.steps * c.batch / c.seconds:,.0f} images/s, batch {c.batch}, {c.cfg.train.epochs} epochs: "
              f"{c.run_seconds():.0f} s of training at this speed")
    print(f"shipped / other, a whole run's training time: {shipped.run_seconds() / other.run_seconds():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
