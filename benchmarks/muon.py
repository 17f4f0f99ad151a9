"""Muon instead of AdamW: does orthogonalised momentum (Jordan et al. 2024; torch.optim.Muon) on the hidden
layers' weights make the CNN or the MLP better at the same number of epochs? Not shipped (see README's
candidates); this makes those rows reproducible.

It trains one configuration as `fmnist train` does (pipeline.build, then fit on the seeded split; no tracking, no
export) with Muon on the weights of every hidden convolution (all but the first) or hidden linear layer, and AdamW
on the rest (the first convolution, batch norm, biases, the classifier), as Muon's authors do. Both follow the
configured one-cycle schedule; Muon's rate is `--lr-scale` x train.lr, rescaled per matrix to AdamW's update size
(torch's `adjust_lr_fn="match_rms_adamw"`), so train.lr and train.weight_decay keep their meaning.

    python benchmarks/muon.py cnn train.threads=1                 # Muon at the shipped learning rate
    python benchmarks/muon.py cnn --lr-scale 2 train.threads=1
"""
from __future__ import annotations

import argparse

import torch
from sklearn.metrics import accuracy_score
from torch import nn

import fmnist.train
from fmnist import data as fdata
from fmnist.config import load_config
from fmnist.errors import UserError, reported
from fmnist.pipeline import build


class MatrixConv2d(nn.Conv2d):
    """A convolution whose weight is stored as the (out, in x kh x kw) matrix torch's Muon requires."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.view(self.out_channels, -1, *self.kernel_size), self.bias)


class Optimizers:
    """Several optimizers stepped as one (what fit and its GradScaler call of an optimizer)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


class Schedulers:
    def __init__(self, *schedulers):
        self.schedulers = schedulers

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.schedulers[-1].get_last_lr()  # AdamW's: train.lr's schedule


def muon_and_adamw(lr_scale: float):
    def make_optimizer(model: nn.Module, cfg) -> Optimizers:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1:]
        for conv in convs:
            conv.__class__ = MatrixConv2d
            conv.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).contiguous())
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]  # not the classifier
        hidden = [m.weight for m in convs + linears]
        hidden_ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if id(p) not in hidden_ids]
        return Optimizers(torch.optim.Muon(hidden, lr=cfg.lr * lr_scale, weight_decay=cfg.weight_decay,
                                           adjust_lr_fn="match_rms_adamw"),
                          torch.optim.AdamW(rest, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True))

    def make_scheduler(opt: Optimizers, cfg, total_steps: int) -> Schedulers:
        return Schedulers(*[torch.optim.lr_scheduler.OneCycleLR(o, max_lr=o.param_groups[0]["lr"],
                                                                total_steps=total_steps, pct_start=cfg.warmup)
                            for o in opt.optimizers])
    return make_optimizer, make_scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", help="cnn or ann (transfer trains on cached activations)")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="Muon's peak rate as a multiple of train.lr")
    ap.add_argument("overrides", nargs="*", help="section.key=value, as for fmnist train")
    args = ap.parse_intermixed_args()
    with reported("muon.py"):  # bad options or data, a diverging run
        if args.arch not in ("cnn", "ann"):
            raise UserError(f"{args.arch}: expected cnn or ann")
        if not args.lr_scale > 0:
            raise UserError(f"--lr-scale {args.lr_scale}: expected a positive number")
        cfg = load_config(args.arch, overrides=args.overrides)
        fmnist.train.make_optimizer, fmnist.train.make_scheduler = muon_and_adamw(args.lr_scale)
        data = fdata.load(cfg.data.data_dir, cfg.data.val_fraction, cfg.train.seed)
        model, rt = build(cfg)
        history = fmnist.train.fit(model, data, cfg.train, rt)
    predicted = fmnist.train.predict_logits(model, data.x_test, rt, cfg.train.eval_batch_size).argmax(1)
    print(f"{args.arch} Muon x{args.lr_scale:g} {' '.join(args.overrides)}: best epoch {history.best_epoch}, "
          f"validation {history.best_val_accuracy:.4f}, test accuracy {accuracy_score(data.y_test, predicted):.4f}, "
          f"{history.seconds:.0f} s of training")


if __name__ == "__main__":
    main()
