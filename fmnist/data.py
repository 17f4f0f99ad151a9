"""Find, validate and load Fashion-MNIST into in-memory uint8 tensors, with a seeded stratified validation split.

Keeping the whole dataset as one tensor and slicing batches from it is what makes training fast on a CPU: an
MLP epoch ran 3.8x faster than torchvision's DataLoader + ToTensor on this project's reference machine.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from filelock import FileLock

from fmnist.errors import DataError

if TYPE_CHECKING:  # imported where tensors are made: commands that only read runs (compare) start faster
    import torch

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts the files
FILES = {  # split -> (images, labels), the names of the original distribution
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIZES = {"train": 60_000, "test": 10_000}
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # IDX: unsigned byte data, 3 and 1 dimensions


@dataclass
class Teacher:
    """A trained network's class probabilities for each training image (distillation), and where they came from."""
    source: str  # train.teacher as given
    run_id: str | None  # the run that logged it, where known (an alias such as @champion moves on)
    probabilities: torch.Tensor  # float (N, 10), row for row with x_train


@dataclass
class Dataset:
    x_train: torch.Tensor  # uint8 (N, 28, 28)
    y_train: torch.Tensor  # int64 (N,)
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str  # the directory the files were read from
    digest: str  # sha256 of the decoded images and labels, short form
    classes: tuple[str, ...] = CLASSES
    teacher: Teacher | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmnist"


def file_lock(path: str | os.PathLike) -> FileLock:
    """A lock shared by every process and thread that names the same file (an SQLite database): the lock file
    lives in the user cache, named by the file's absolute path, not beside the file in a folder it may not own."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return FileLock(locks / f"sqlite-{digest}.lock", timeout=300)


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where to look, in order: the explicit directory or $FMNIST_DATA, the system package, the user cache."""
    explicit = data_dir or os.environ.get("FMNIST_DATA")
    if explicit:
        return [Path(explicit)]
    # torchvision's download lands in <root>/FashionMNIST/raw, so the cache is searched there too.
    return [SYSTEM_DIR, cache_dir(), cache_dir() / "FashionMNIST" / "raw"]


def find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_data_dir(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    candidates = candidate_dirs(data_dir)
    for directory in candidates:
        if all(find_file(directory, name) for pair in FILES.values() for name in pair):
            return directory
    if data_dir or os.environ.get("FMNIST_DATA"):
        missing = [n for pair in FILES.values() for n in pair if not find_file(candidates[0], n)]
        raise DataError(f"{candidates[0]}: missing {', '.join(missing)} (.gz or not); expected the four "
                        "Fashion-MNIST IDX files there")
    if download:
        try:
            return _download(cache_dir())
        except Exception as e:  # no internet here is the common case; the message below says what to do
            reason = f"{type(e).__name__}: {e}"
    else:
        reason = "download disabled"
    raise DataError(
        "Fashion-MNIST not found in " + ", ".join(map(str, candidates)) + f" and could not be downloaded ({reason}).\n"
        "Get it one of these ways:\n"
        "  sudo apt-get install dataset-fashion-mnist   # Debian/Ubuntu, installs into /usr/share/datasets/fashion-mnist\n"
        "  fmnist train ... with internet access         # downloads through torchvision into " + str(cache_dir()) + "\n"
        "  --data-dir DIR or FMNIST_DATA=DIR             # a directory holding the four original .gz IDX files")


def _download(root: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(root), train=True, download=True)
    return root / "FashionMNIST" / "raw"


def read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """Read one IDX file (gzip or not, detected by content) and check its header against what is expected.

    torchvision's reader only asserts; this one says which file is wrong and how.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    ndim = len(shape)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header of {header} bytes")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} "
                        f"(IDX, unsigned bytes, {ndim} dimension{'s' * (ndim > 1)})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims != shape:
        raise DataError(f"{path}: dimensions {dims}, expected {shape}")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: {len(raw) - header} data bytes, the header promises {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_split(directory: Path, split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    image_name, label_name = FILES[split]
    image_path, label_path = find_file(directory, image_name), find_file(directory, label_name)
    for name, p in ((image_name, image_path), (label_name, label_path)):
        if p is None:
            raise DataError(f"{directory / name}(.gz): file not found")
    labels = read_idx(label_path, LABEL_MAGIC, (n or _count(label_path),))
    images = read_idx(image_path, IMAGE_MAGIC, (len(labels), 28, 28))
    if labels.max(initial=0) > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{label_path}: label {labels[bad]} at index {bad}, expected 0-9")
    return images, labels


def _count(path: Path) -> int:
    """The item count from a label file's header, so images are checked against the labels they go with."""
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(8)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from None
    return int.from_bytes(header[4:8], "big") if len(header) == 8 else 0


def load(data_dir: str | os.PathLike | None = None, val_fraction: float = 0.1, seed: int = 0,
         strict_sizes: bool | None = None) -> Dataset:
    """Load train/validation/test tensors. The test split is for the final evaluation only.

    `strict_sizes` checks the canonical 60k/10k counts; it is on for the system and cache copies and off for an
    explicit directory, so tests and users can point at a smaller IDX set.
    """
    directory = find_data_dir(data_dir)
    strict = strict_sizes if strict_sizes is not None else not (data_dir or os.environ.get("FMNIST_DATA"))
    x, y = read_split(directory, "train", SIZES["train"] if strict else None)
    x_test, y_test = read_split(directory, "test", SIZES["test"] if strict else None)
    import torch

    idx_train, idx_val = split(y, val_fraction, seed, directory)
    t = torch.from_numpy
    return Dataset(
        x_train=t(x[idx_train].copy()), y_train=t(y[idx_train].astype(np.int64)),
        x_val=t(x[idx_val].copy()), y_val=t(y[idx_val].astype(np.int64)),
        x_test=t(x_test.copy()), y_test=t(y_test.astype(np.int64)),
        source=str(directory), digest=digest(x, y, x_test, y_test))


def split(labels: np.ndarray, val_fraction: float, seed: int, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified train/validation indices: every class in both, in proportion."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels, minlength=10)
    n_val = int(np.ceil(val_fraction * len(labels)))
    present = int((counts > 0).sum())
    if counts[counts > 0].min() < 2 or not present <= n_val <= len(labels) - present:
        rare = int(np.argmin(np.where(counts > 0, counts, np.iinfo(int).max)))
        fewest = int(counts[rare])
        raise DataError(f"{directory}: data.val_fraction={val_fraction} of {len(labels)} training images cannot "
                        f"hold every class in both splits (class {rare} has {fewest} image"
                        f"{'s' * (fewest != 1)}); expected at least 2 per class and a validation split of "
                        f"{present} to {len(labels) - present} images")
    return train_test_split(np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed)


def digest(*arrays: np.ndarray) -> str:
    """Content hash of the decoded arrays, so gzip or not, the same data has the same digest."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
