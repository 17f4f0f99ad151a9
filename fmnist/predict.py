"""Classify raw images with a trained network: input checks, file readers and the answer as a table.

A trained network is saved as a `torch.export` program, so loading it needs neither this package's model code
nor the pretrained-weights package. tracking.py wraps `Classifier` as the MLflow pyfunc model that every run
logs; `fmnist predict` reads image files and prints what that model says.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmnist.data import CLASSES

SIZE = 28
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class InputError(ValueError):
    """Images of the wrong shape, dtype or format; the message names the input and what was expected."""


def export_network(model: torch.nn.Module, example: np.ndarray) -> torch.export.ExportedProgram:
    """The model as a self-contained program taking uint8 (N, 28, 28) batches of any size."""
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model.cpu().eval(), (torch.from_numpy(example),), dynamic_shapes=({0: batch},))


def check_images(images, source: str = "input") -> np.ndarray:
    """Raw grey images as uint8 (N, 28, 28); a single (28, 28) image or (N, 1, 28, 28) is accepted too, and so
    are integers of a wider type that lie in 0-255."""
    if isinstance(images, pd.DataFrame):
        raise InputError(f"{source}: a DataFrame; expected a uint8 array of shape (N, 28, 28)")
    array = np.asarray(images)
    if array.dtype.kind in "iu" and array.dtype != np.uint8 and array.size and 0 <= array.min() <= array.max() <= 255:
        array = array.astype(np.uint8)  # JSON from a REST client arrives as int64
    if array.dtype != np.uint8:
        hint = " (0-1 floats? use (x * 255).round().astype(np.uint8))" if array.dtype.kind == "f" else ""
        raise InputError(f"{source}: dtype {array.dtype}, expected uint8 pixel values 0-255, as in "
                         f"Fashion-MNIST{hint}")
    if array.shape == (SIZE, SIZE):
        array = array[None]
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (SIZE, SIZE) or len(array) == 0:
        raise InputError(f"{source}: shape {array.shape}, expected (N, 28, 28) grey images with N >= 1, "
                         "or one (28, 28) image")
    return array


class Classifier:
    """A trained network plus class names: raw images in, class name and per-class probabilities out."""

    def __init__(self, network: torch.nn.Module, classes: tuple[str, ...] = CLASSES, batch_size: int = 1024):
        self.network, self.classes, self.batch_size = network, classes, batch_size

    def probabilities(self, images) -> np.ndarray:
        images = torch.from_numpy(check_images(images))
        with torch.no_grad():
            logits = torch.cat([self.network(chunk) for chunk in images.split(self.batch_size)])
        return logits.float().softmax(1).numpy()

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
