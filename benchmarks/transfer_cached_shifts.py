"""Shifted copies in the activation cache: does more variety in what the transfer model's trained stages see cure
their overfitting of the cached activations? Not shipped (see README's candidates); this makes those rows
reproducible.

It prepares the shipped transfer model as `fmnist train` does (the cached activations of the training set and its
flipped copy), adds `--copies` more copies of the training set, each image shifted by up to 2 px and flipped at
random before extraction (the CNN's augmentation), trains the trained stages on all of them and scores the test
set. The extra copies are extracted afresh each time (they are not cached).

    python benchmarks/transfer_cached_shifts.py --copies 0                        # the baseline
    python benchmarks/transfer_cached_shifts.py --copies 2 train.epochs=2         # the baseline's optimizer steps
    python benchmarks/transfer_cached_shifts.py --copies 2                        # twice its training
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from sklearn.metrics import accuracy_score

from fmnist import data as fdata
from fmnist.config import load_config
from fmnist.errors import UserError, reported
from fmnist.features import extract, prepare
from fmnist.models.layers import fold_batchnorm
from fmnist.pipeline import build
from fmnist.train import augment, fit, predict_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2, help="randomly shifted and flipped copies to add (0: none)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, as for fmnist train --arch transfer")
    args = ap.parse_args()
    with reported("transfer_cached_shifts.py"):  # bad options or data, missing weights, a diverging run
        if args.copies < 0:
            raise UserError(f"--copies {args.copies}: expected 0 or more")
        train_with_copies(args.copies, args.overrides)


def train_with_copies(n_copies: int, overrides: list[str]) -> None:
    cfg = load_config("transfer", overrides=overrides)
    data = fdata.load(cfg.data.data_dir, cfg.data.val_fraction, cfg.train.seed)
    model, rt = build(cfg)
    prepared = prepare(model, data, rt, cfg.train)
    x, y = prepared.data.x_train, prepared.data.y_train
    if n_copies:
        start, frozen = time.perf_counter(), fold_batchnorm(model.frozen_part())
        generator = torch.Generator().manual_seed(cfg.train.seed)
        copies = [extract(frozen, augment(data.x_train, generator), rt, cfg.train.eval_batch_size, desc="shifted")
                  for _ in range(n_copies)]
        x, y = torch.cat([x, *copies]), torch.cat([y, data.y_train.repeat(n_copies)])
        print(f"{n_copies} shifted copies extracted in {time.perf_counter() - start:.0f} s", flush=True)
    history = fit(prepared.model, dataclasses.replace(prepared.data, x_train=x, y_train=y), prepared.train, rt)
    predicted = predict_logits(prepared.model, prepared.data.x_test, rt, cfg.train.eval_batch_size).argmax(1)
    print(f"--copies {n_copies} {' '.join(overrides)}: {len(y):,} training inputs, best epoch "
          f"{history.best_epoch}, validation {history.best_val_accuracy:.4f}, test accuracy "
          f"{accuracy_score(data.y_test, predicted):.4f}, {history.seconds:.0f} s of training")


if __name__ == "__main__":
    main()
