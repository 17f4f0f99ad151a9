"""Activations of a transfer model's frozen part, computed once and cached on disk.

The frozen part (resize, normalise, the frozen backbone stages) gives the same output in every epoch, run and
tuning trial, so it runs once per image set; training then runs only the trained stages on the stored
activations. A cache file is keyed by the frozen part (backbone, resolution, cut, precision) and a digest of the
images themselves, so a different split, dataset or flip can never be served stale activations.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fmnist.data import Dataset, cache_dir
from fmnist.models.transfer import TransferNet
from fmnist.train import Runtime

VERSION = 1  # part of every cache key: bump when the extraction itself changes, so old files are not reused


@dataclass
class Features:
    data: Dataset  # the frozen part's activations in place of images; labels doubled when a flipped copy is added
    seconds: float  # wall time spent computing or reading activations
    cache_hit: bool  # every split came from the cache


def features_dir() -> Path:
    return cache_dir() / "features"


def cache_path(model: TransferNet, rt: Runtime, images: torch.Tensor) -> Path | None:
    if model.cache_tag is None:  # random weights differ per build: nothing to reuse
        return None
    precision = "fp32" if rt.autocast is None else str(rt.autocast).removeprefix("torch.")
    content = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]
    return features_dir() / f"{model.cache_tag}-{precision}-{content}-v{VERSION}.pt"


@torch.no_grad()
def fold_batchnorm(frozen: nn.Module) -> nn.Module:
    """A copy of an eval-mode network with each batch norm folded into the convolution before it.

    Frozen batch norm is a fixed per-channel affine map, so scaling the conv's weights and adding a bias computes
    the same thing without a pass over the activations: batch norm was a quarter of EfficientNet's CPU forward.
    """
    frozen = copy.deepcopy(frozen).eval()
    for parent in list(frozen.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.affine:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
                # timm's BatchNormAct2d also holds the activation that follows; keep it.
                setattr(parent, bn_name, nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity())
    return frozen


@torch.no_grad()
def extract(frozen: nn.Module, images: torch.Tensor, rt: Runtime, batch_size: int, desc: str) -> torch.Tensor:
    frozen.eval().to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=None):
        with rt.autocast_ctx():
            out.append(frozen(images[i:i + batch_size].to(rt.device)).cpu())
    return torch.cat(out)


def frozen_features(model: TransferNet, data: Dataset, rt: Runtime, flip: bool = False,
                    batch_size: int = 256) -> Features:
    """The frozen part's output for every split (and a horizontally flipped copy of train when `flip`)."""
    start, hits = time.perf_counter(), []
    folded = functools.cache(lambda: fold_batchnorm(model.frozen_part()))  # copied and folded on the first miss only

    def activations(name: str, images: torch.Tensor) -> torch.Tensor:
        path = cache_path(model, rt, images)
        if path is not None and path.is_file():
            hits.append(True)
            return torch.load(path, weights_only=True)
        hits.append(False)
        out = extract(folded(), images, rt, batch_size, desc=f"features {name}")
        if path is not None:  # write then rename, so concurrent runs never read half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(out, tmp)
            tmp.replace(path)
        return out

    x_train, y_train = activations("train", data.x_train), data.y_train
    if flip:
        x_train = torch.cat([x_train, activations("train flipped", data.x_train.flip(-1))])
        y_train = torch.cat([y_train, y_train])
    features = dataclasses.replace(data, x_train=x_train, y_train=y_train, x_val=activations("validation", data.x_val),
                                   x_test=activations("test", data.x_test))
    return Features(features, time.perf_counter() - start, all(hits))
