"""Classify raw images with a trained network: input checks, file readers and the answer as a table.

A trained network travels as a `torch.export` program with its batch norm folded, so loading it needs neither
this package's model code nor the pretrained-weights package. `Classifier` runs it the way the training code
runs inference: bf16 autocast and channels_last where the CPU has native bf16, fp32 elsewhere, chosen when it is
loaded. A run's test metrics are computed through the same `Classifier` on the same saved program that the run
logs as its MLflow model, so the registry re-scores the test set to the run's numbers.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmnist.data import CLASSES
from fmnist.errors import InputError
from fmnist.models.layers import fold_batchnorm
from fmnist.train import Runtime, cpu_autocast, has_convolutions

SIZE = 28
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXPECTED = "expected uint8 pixel values 0-255 in (N, 28, 28) grey images or one (28, 28) image, as in Fashion-MNIST"


def export_network(model: torch.nn.Module, example: np.ndarray) -> torch.export.ExportedProgram:
    """The model, batch norm folded, as a self-contained program taking uint8 (N, 28, 28) batches of any size."""
    batch = torch.export.Dim("batch", min=1)
    # The standard layout, whatever the training's (channels_last with bf16 or CUDA): the loading side chooses.
    network = fold_batchnorm(model).cpu().to(memory_format=torch.contiguous_format)
    return torch.export.export(network, (torch.from_numpy(example),), dynamic_shapes=({0: batch},))


def check_images(images, source: str = "input") -> np.ndarray:
    """Raw grey images as uint8 (N, 28, 28); a single (28, 28) image or (N, 1, 28, 28) is accepted too, and so
    are integers of a wider type that lie in 0-255 (JSON from a REST client arrives as int64)."""
    if isinstance(images, pd.DataFrame):
        raise InputError(f"{source}: a DataFrame; {EXPECTED}")
    try:
        array = np.asarray(images)
    except ValueError:  # ragged nested lists
        raise InputError(f"{source}: rows of different lengths; {EXPECTED}") from None
    if array.size == 0:
        raise InputError(f"{source}: empty (shape {array.shape}); {EXPECTED}, with N >= 1")
    if array.dtype.kind not in "iuf":
        what = {"U": "text", "S": "bytes", "O": "null or mixed values", "b": "true/false values"}.get(
            array.dtype.kind, f"dtype {array.dtype}")
        raise InputError(f"{source}: {what}; {EXPECTED}")
    if array.dtype.kind == "f":
        hint = " (0-1 floats? send (x * 255).round() as integers)" if np.nanmax(array) <= 1 else ""
        raise InputError(f"{source}: dtype {array.dtype}{hint}; {EXPECTED}")
    if array.dtype != np.uint8:
        low, high = array.min(), array.max()
        if low < 0 or high > 255:
            raise InputError(f"{source}: pixel values from {low} to {high} are out of range; {EXPECTED}")
        array = array.astype(np.uint8)
    if array.shape == (SIZE, SIZE):
        array = array[None]
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (SIZE, SIZE):
        raise InputError(f"{source}: shape {array.shape}; {EXPECTED}")
    return array if array.flags.writeable else array.copy()  # torch warns on read-only arrays


ACTIVATION_BUDGET = 2 ** 24  # values in a forward pass's largest activation (32 MB in bf16)


def batch_for(network: torch.nn.Module, most: int = 256) -> int:
    """Images per forward pass: a power of two that keeps the program's largest activation within the budget.

    Larger passes allocate buffers beyond malloc's mmap threshold on every batch, and the kernel's fresh zeroed
    pages then cost more than the batch saves. Measured on 2 cores for the transfer model at 112 px (312,000 values
    per image after its stem): 498 images/s and 1.4 ms of system time per image at 256, 700 and none at 32; the
    CNN (25,000 values) and the MLP are fastest at 128-256."""
    graph = getattr(network, "graph", None)  # an exported program's module records every node's shape
    largest = 1
    for node in graph.nodes if graph is not None else ():
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() > 1:
            with contextlib.suppress(TypeError):  # a symbolic size: not a per-image dimension
                largest = max(largest, math.prod(int(d) for d in value.shape[1:]))
    return int(min(most, max(1, 2 ** math.floor(math.log2(max(1.0, ACTIVATION_BUDGET / largest))))))


class Classifier:
    """A trained network plus class names: raw images in, class name and per-class probabilities out.

    `precision`: auto (bf16 where the CPU has native bf16, else fp32), bf16 or fp32.
    """

    def __init__(self, network: torch.nn.Module, precision: str = "auto", classes: tuple[str, ...] = CLASSES,
                 batch_size: int | None = None):
        autocast = cpu_autocast(precision)  # the training's rule, so a model serves as it was trained
        self.runtime = Runtime(torch.device("cpu"), autocast,
                               channels_last=autocast is not None and has_convolutions(network))
        self.network = network.to(memory_format=self.runtime.memory_format)
        self.classes, self.batch_size = classes, batch_size or batch_for(network)

    @classmethod
    def load(cls, path: str | Path, precision: str = "auto") -> Classifier:
        return cls(torch.export.load(str(path)).module(), precision)

    def probabilities(self, images) -> np.ndarray:
        images = torch.from_numpy(check_images(images))
        with torch.no_grad(), self.runtime.autocast_ctx():
            logits = torch.cat([self.network(chunk).float() for chunk in images.split(self.batch_size)])
        return logits.softmax(1).numpy()

    def predict(self, images) -> pd.DataFrame:
        """One row per image: `class`, its `probability`, then one probability column per class."""
        p = self.probabilities(images)
        table = pd.DataFrame(p, columns=list(self.classes))
        table.insert(0, "probability", p.max(1))
        table.insert(0, "class", np.asarray(self.classes, dtype=object)[p.argmax(1)])
        return table


def read_images(paths: list[str | Path]) -> tuple[np.ndarray, list[str]]:
    """PNG/JPEG files (one 28x28 image each, converted to grey) and .npy batches -> (uint8 images, a name each)."""
    arrays, names = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise InputError(f"{path}: not a readable .npy array ({e})") from None
            array = check_images(array, str(path))
            names += [f"{path}[{i}]" for i in range(len(array))] if len(array) > 1 else [str(path)]
        elif suffix in IMAGE_SUFFIXES:
            array = check_images(_read_picture(path), str(path))
            names.append(str(path))
        else:
            raise InputError(f"{path}: unknown file type {suffix or '(none)'}; expected .png, .jpg/.jpeg or .npy")
        arrays.append(array)
    if not arrays:
        raise InputError("no input files; expected .png, .jpg/.jpeg or .npy files")
    return np.concatenate(arrays), names


def _read_picture(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = image.convert("L")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from None
    if grey.size != (SIZE, SIZE):
        raise InputError(f"{path}: {grey.size[0]}x{grey.size[1]} pixels, expected 28x28 (Fashion-MNIST's size: "
                         "a light garment on a dark background); resize it first")
    return np.asarray(grey, dtype=np.uint8)
