"""What trains on what: `prepare(model, data, ...)` hands back the part of a model that trains and its data.

Every model trains whole on the images, except a transfer model with a frozen part: that part (resize,
normalise, the frozen backbone stages) gives the same output in every epoch, run and tuning trial, so it runs once
per image set and its activations are cached on disk; training then runs only the trained stages on them.

A cache entry is keyed by the frozen part (backbone, resolution, cut, precision, a digest of its weights) and a
digest of the images, so a different dataset, flip or set of weights is never served stale activations; the
training and validation images are one entry whatever the split, so a run with another seed reuses it.
Each entry stores a digest of its own contents, checked on every read: a truncated or altered file is reported,
removed and computed again.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fmnist.config import TrainConfig
from fmnist.data import Dataset, cache_dir
from fmnist.models.layers import fold_batchnorm
from fmnist.models.transfer import TransferNet
from fmnist.train import Runtime

VERSION = 2  # part of every cache key: bump when the extraction or the file format changes


@dataclass
class Prepared:
    model: nn.Module  # the part that trains
    data: Dataset  # what it trains on: images, or activations with labels doubled by a flipped copy
    train: TrainConfig  # the training settings for it (augmentation is off on cached activations)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # to log: extraction seconds
    tags: dict[str, str] = dataclasses.field(default_factory=dict)  # to log: cache hit or miss


def prepare(model: nn.Module, data: Dataset, rt: Runtime, cfg: TrainConfig) -> Prepared:
    """The model and data as they are, or a transfer model's trained part on its frozen part's activations."""
    if not isinstance(model, TransferNet) or model.cut == 0:
        return Prepared(model, data, cfg)
    # The one augmentation that survives caching is a flipped copy of the training set.
    start, hits = time.perf_counter(), []
    folded = functools.cache(lambda: fold_batchnorm(model.frozen_part()))  # copied and folded on a miss only
    key = frozen_key(model, rt)

    def activations(name: str, images: torch.Tensor) -> torch.Tensor:
        path = None if key is None else features_dir() / f"{key}-{content_digest(images)}.pt"
        cached = read_entry(path, len(images)) if path is not None else None
        hits.append(cached is not None)
        if cached is not None:
            return cached
        out = extract(folded(), images, rt, cfg.eval_batch_size, desc=f"features {name}")
        if path is not None:
            write_entry(path, out)
        return out

    # Training and validation images are extracted together in an order of their own, not the split's, so every
    # seed's split (each run of a multi-seed study) reads the activations the first one computed.
    pool, where = distinct(torch.cat([data.x_train, data.x_val]))
    train_at, val_at = where[:len(data.y_train)], where[len(data.y_train):]
    pooled = activations("train + validation", pool)
    x_train, x_val, y_train = pooled[train_at], pooled[val_at], data.y_train
    if cfg.augment:
        x_train = torch.cat([x_train, activations("train + validation, flipped", pool.flip(-1))[train_at]])
        y_train = torch.cat([y_train, y_train])
    features = dataclasses.replace(data, x_train=x_train, y_train=y_train, x_val=x_val,
                                   x_test=activations("test", data.x_test))
    seconds, hit = time.perf_counter() - start, all(hits)
    print(f"frozen {model.cut} of {len(model.stages)} stages: activations {tuple(x_train.shape)} in {seconds:.0f}s "
          f"({'from the cache' if hit else 'computed'})", flush=True)
    return Prepared(model.trained_part(), features, dataclasses.replace(cfg, augment=False, erase=0.0),
                    {"feature_seconds": seconds}, {"feature_cache": "hit" if hit else "miss"})


def distinct(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct images in byte order (the same whatever order they came in), and where each given one is."""
    rows = np.ascontiguousarray(images.numpy().reshape(len(images), -1))
    found, where = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))).ravel(), return_inverse=True)
    return (torch.from_numpy(found.view(np.uint8).reshape(-1, *images.shape[1:])),  # np.unique's own array
            torch.from_numpy(where.ravel()))


def features_dir() -> Path:
    return cache_dir() / "features"


def frozen_key(model: TransferNet, rt: Runtime) -> str | None:
    """The frozen part's name, precision and weights; None for random weights (they differ per build)."""
    if model.cache_tag is None:
        return None
    precision = "fp32" if rt.autocast is None else str(rt.autocast).removeprefix("torch.")
    weights = hashlib.sha256()
    for name, tensor in sorted(model.frozen_part().state_dict().items()):
        weights.update(name.encode())
        weights.update(_buffer(tensor))
    return f"{model.cache_tag}-{precision}-w{weights.hexdigest()[:12]}-v{VERSION}"


def content_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_buffer(tensor)).hexdigest()[:16]


def _buffer(tensor: torch.Tensor):
    """The tensor's bytes without a copy (bf16 has no NumPy dtype, so they are viewed as bytes)."""
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()


def write_entry(path: Path, activations: torch.Tensor) -> None:
    """Write then rename, so a concurrent run never reads half a file; the digest lets a reader check it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"activations": activations, "sha256": hashlib.sha256(_buffer(activations)).hexdigest()}, tmp)
    tmp.replace(path)


def read_entry(path: Path, count: int) -> torch.Tensor | None:
    """The cached activations of `count` images, or None (absent, or damaged: reported and removed)."""
    remove_stale_tmp(path.parent)
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, weights_only=True)
        tensor = entry["activations"]
        problem = None
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or len(tensor) != count:
            problem = f"expected activations of {count} images, found {getattr(tensor, 'shape', type(tensor))}"
        elif tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            problem = f"expected float activations, found {tensor.dtype}"
        elif hashlib.sha256(_buffer(tensor)).hexdigest() != entry["sha256"]:
            problem = "its contents do not match the digest stored with them"
    except Exception as e:  # torch.load's errors for a damaged file range widely (zip, pickle, EOF)
        problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if problem is None:
        return tensor
    print(f"fmnist: activation cache entry {path} is damaged ({problem}); removed, computing it again",
          file=sys.stderr, flush=True)
    path.unlink(missing_ok=True)
    return None


def remove_stale_tmp(directory: Path) -> None:
    """Half-written entries (`<name>.<pid>.tmp`) whose writer is gone, e.g. killed mid-write."""
    for tmp in directory.glob("*.tmp") if directory.is_dir() else ():
        pid = tmp.suffixes[-2].lstrip(".") if len(tmp.suffixes) >= 2 else ""
        if not pid.isdigit() or not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@torch.no_grad()
def extract(frozen: nn.Module, images: torch.Tensor, rt: Runtime, batch_size: int, desc: str) -> torch.Tensor:
    frozen.eval().to(rt.device, memory_format=rt.memory_format)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=None):
        with rt.autocast_ctx():
            out.append(frozen(images[i:i + batch_size].to(rt.device)).cpu())
    return torch.cat(out)
