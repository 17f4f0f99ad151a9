"""Test-time views: what averaging a trained image model's class probabilities over shifted and mirrored copies
of each test image adds. The CNN ships with the mirror (model.average_mirror); the shifts are not shipped (see
README's candidates); this makes those rows reproducible. Each view is scored by the network alone, one view a
pass, whatever its own eval-mode averaging.

It trains one configuration as `fmnist train` does (pipeline.build, then fit on the seeded split; no tracking, no
export), then scores the test set with each set of views: the image alone, with its mirror image, and the mirror
with the 4 or all 8 one-pixel shifts (10 and 18 views; zero padding, as the training shift).

    python benchmarks/test_time_views.py cnn train.threads=1 train.seed=1
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

from fmnist import data as fdata
from fmnist.config import Config, load_config
from fmnist.errors import UserError, reported
from fmnist.models.layers import MirrorAveraged
from fmnist.pipeline import build
from fmnist.train import fit, predict_logits

CROSS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
SQUARE = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
VIEWS = {  # name -> (row shift, column shift, mirrored) of each view
    "alone": [(0, 0, False)],
    "mirror": [(0, 0, False), (0, 0, True)],
    "mirror + 4 shifts": [(dy, dx, m) for dy, dx in CROSS for m in (False, True)],
    "mirror + 8 shifts": [(dy, dx, m) for dy, dx in SQUARE for m in (False, True)],
}


def view(x: torch.Tensor, dy: int, dx: int, mirrored: bool) -> torch.Tensor:
    """uint8 (N, 28, 28) images moved by (dy, dx) px with zeros shifted in, then mirrored if asked."""
    moved = torch.roll(F.pad(x, (1, 1, 1, 1)), (dy, dx), dims=(1, 2))[:, 1:-1, 1:-1]
    return moved.flip(-1) if mirrored else moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", help="an image model (cnn or ann; transfer trains on cached activations)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, as for fmnist train")
    args = ap.parse_args()
    with reported("test_time_views.py"):  # bad options or data, missing weights, a diverging run
        cfg = load_config(args.arch, overrides=args.overrides)
        if args.arch == "transfer":
            raise UserError("transfer: trains on cached activations, so its views cannot be scored here; "
                            "expected cnn or ann")
        score_views(args.arch, args.overrides, cfg)


def score_views(arch: str, overrides: list[str], cfg: Config) -> None:
    data = fdata.load(cfg.data.data_dir, cfg.data.val_fraction, cfg.train.seed)
    model, rt = build(cfg)
    history = fit(model, data, cfg.train, rt)
    print(f"{arch} {' '.join(overrides)}: best epoch {history.best_epoch}, validation "
          f"{history.best_val_accuracy:.4f}, {history.seconds:.0f} s of training")
    single = torch.nn.Sequential(*model) if isinstance(model, MirrorAveraged) else model  # the same layers
    for name, views in VIEWS.items():
        start = time.perf_counter()
        probabilities = sum(predict_logits(single, view(data.x_test, *v), rt, cfg.train.eval_batch_size).softmax(1)
                            for v in views)
        predicted = probabilities.argmax(1)
        print(f"{name:>18} ({len(views):>2} views): test accuracy {accuracy_score(data.y_test, predicted):.4f}, "
              f"macro F1 {f1_score(data.y_test, predicted, average='macro'):.4f}, "
              f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
