import gzip

import pytest
import torch

from conftest import synthetic, write_dataset
from fmnist import data as fdata
from fmnist.data import IMAGE_MAGIC, LABEL_MAGIC
from fmnist.errors import DataError


def test_loads_gzip_and_plain_files_to_the_same_tensors(tmp_path):
    gz = fdata.load(write_dataset(tmp_path / "gz"), val_fraction=0.2, seed=3)
    plain = fdata.load(write_dataset(tmp_path / "plain", compress=False), val_fraction=0.2, seed=3)
    assert gz.x_train.dtype == torch.uint8 and gz.x_train.shape[1:] == (28, 28)
    assert (len(gz.y_train), len(gz.y_val), len(gz.y_test)) == (480, 120, 200)
    assert torch.equal(gz.x_train, plain.x_train) and torch.equal(gz.y_val, plain.y_val)
    assert gz.digest == plain.digest
    assert len(gz.classes) == 10 and gz.classes[0] == "T-shirt/top"


def test_split_is_stratified_seeded_and_disjoint(tmp_path):
    d = write_dataset(tmp_path)
    a, b, c = fdata.load(d, 0.2, seed=0), fdata.load(d, 0.2, seed=0), fdata.load(d, 0.2, seed=1)
    assert torch.equal(a.y_val, b.y_val) and torch.equal(a.x_val, b.x_val)
    assert not torch.equal(a.x_val, c.x_val)
    assert torch.bincount(a.y_val).tolist() == [12] * 10  # 60 per class, 20% each
    images, _ = synthetic(600, 1)
    train_rows = {bytes(x) for x in a.x_train.numpy()}
    assert not any(bytes(x) in train_rows for x in a.x_val.numpy())
    assert len(train_rows) + len(a.y_val) == len({bytes(x) for x in images})


def corrupt(tmp_path, name, payload: bytes):
    d = write_dataset(tmp_path)
    (d / f"{name}.gz").write_bytes(gzip.compress(payload))
    return d


@pytest.mark.parametrize("name,payload,named,expected", [
    ("train-images-idx3-ubyte", b"".join(d.to_bytes(4, "big") for d in (0x0801, 600, 28, 28)) + bytes(470400),
     "train-images-idx3-ubyte.gz", "magic number 0x00000801, expected 0x00000803"),
    ("train-images-idx3-ubyte", IMAGE_MAGIC.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (600, 32, 32)),
     "train-images-idx3-ubyte.gz", "dimensions (600, 32, 32), expected (600, 28, 28)"),
    ("train-images-idx3-ubyte", IMAGE_MAGIC.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (600, 28, 28))
     + bytes(100), "train-images-idx3-ubyte.gz", "100 data bytes, the header promises 470400"),
    ("t10k-labels-idx1-ubyte", LABEL_MAGIC.to_bytes(4, "big") + (200).to_bytes(4, "big") + bytes(199) + b"\x0c",
     "t10k-labels-idx1-ubyte.gz", "label 12 at index 199, expected 0-9"),
    # The labels say 150 items, the image file holds 200: the image file is the one named.
    ("t10k-labels-idx1-ubyte", LABEL_MAGIC.to_bytes(4, "big") + (150).to_bytes(4, "big") + bytes(150),
     "t10k-images-idx3-ubyte.gz", "dimensions (200, 28, 28), expected (150, 28, 28)"),
    ("train-labels-idx1-ubyte", b"\x00\x00", "train-labels-idx1-ubyte.gz", "too short for an IDX header"),
])
def test_corrupt_files_are_refused_with_file_name_and_reason(tmp_path, name, payload, named, expected):
    d = corrupt(tmp_path, name, payload)
    with pytest.raises(DataError) as e:
        fdata.load(d)
    assert f"{named}: " in str(e.value) and expected in str(e.value)


def test_a_split_that_cannot_hold_every_class_is_refused_clearly(tmp_path):
    d = write_dataset(tmp_path, n_train=15)  # 1 or 2 images per class
    with pytest.raises(DataError, match=r"data.val_fraction=0.1 of 15 training images cannot hold every class in "
                                        r"both splits \(class \d has 1 image\)"):
        fdata.load(d, val_fraction=0.1)


def test_broken_gzip_and_missing_file_are_named(tmp_path):
    d = write_dataset(tmp_path)
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: corrupt gzip"):
        fdata.load(d)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte"):
        fdata.load(d)


def test_real_size_is_required_for_the_system_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    monkeypatch.setattr(fdata, "SYSTEM_DIR", write_dataset(tmp_path / "system"))
    with pytest.raises(DataError, match=r"dimensions \(600,\), expected \(60000,\)"):
        fdata.load()


def test_search_order_explicit_then_env_then_system_then_cache(tmp_path, monkeypatch):
    explicit, env, system = (write_dataset(tmp_path / n) for n in ("explicit", "env", "system"))
    monkeypatch.setattr(fdata, "SYSTEM_DIR", system)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FMNIST_DATA", str(env))
    assert fdata.find_data_dir(explicit) == explicit
    assert fdata.find_data_dir() == env
    monkeypatch.delenv("FMNIST_DATA")
    assert fdata.find_data_dir() == system
    monkeypatch.setattr(fdata, "SYSTEM_DIR", tmp_path / "nowhere")
    cached = write_dataset(tmp_path / "cache" / "fmnist" / "FashionMNIST" / "raw")
    assert fdata.find_data_dir() == cached


def test_missing_everywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    monkeypatch.setattr(fdata, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        fdata.find_data_dir(download=False)
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "--data-dir" in str(e.value)
    with pytest.raises(DataError, match="nowhere: missing train-images-idx3-ubyte"):
        fdata.find_data_dir(tmp_path / "nowhere")


@pytest.mark.real_data
@pytest.mark.skipif(not fdata.SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_dataset_loads_with_canonical_sizes():
    ds = fdata.load(fdata.SYSTEM_DIR, val_fraction=0.1, seed=0)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (54_000, 6_000, 10_000)
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert abs(ds.x_train.float().mean().item() / 255 - 0.286) < 0.002
