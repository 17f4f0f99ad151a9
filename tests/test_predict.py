"""Classifying raw images: input checks, file readers, and an exported network that answers like the model."""
import numpy as np
import pytest
import torch
from PIL import Image

from fmnist.data import CLASSES
from fmnist.models import build_model
from fmnist.errors import InputError
from fmnist.predict import Classifier, batch_for, check_images, export_network, read_images


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_model("cnn", widths=[8, 16]).eval()


def test_exported_network_matches_the_model_for_any_batch_size(cnn):
    for bn in (m for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics far from 0/1
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    program = export_network(cnn, np.zeros((2, 28, 28), np.uint8)).module()
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)  # folded into the convolutions
    for n in (1, 5):
        x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        torch.testing.assert_close(program(x), cnn(x), atol=1e-4, rtol=1e-4)


def test_exporting_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = build_model("cnn", widths=[8, 16]).train().to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_network(model, np.zeros((2, 28, 28), np.uint8))
    assert model.training  # export folds a copy: the caller keeps its mode, weights and layout
    # (and its device: tests/test_cuda.py checks that where a GPU is)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    hidden = next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert hidden.is_contiguous(memory_format=torch.channels_last) and not hidden.is_contiguous()


def test_classifier_picks_its_precision_when_loaded(cnn):
    from fmnist.train import native_bf16

    program = export_network(cnn, np.zeros((2, 28, 28), np.uint8)).module()
    assert Classifier(program, "fp32").runtime.autocast is None
    bf16 = Classifier(program, "bf16")
    assert bf16.runtime.autocast is torch.bfloat16 and bf16.runtime.channels_last
    assert (Classifier(program, "auto").runtime.autocast is torch.bfloat16) == native_bf16()


def test_each_forward_pass_keeps_its_largest_activation_within_the_budget(cnn):
    small = export_network(cnn, np.zeros((2, 28, 28), np.uint8)).module()  # 8 x 28 x 28 values per image
    assert Classifier(small).batch_size == 256
    big = torch.nn.Sequential(torch.nn.Upsample(size=256), torch.nn.Conv2d(1, 16, 3, padding=1))
    program = torch.export.export(big.eval(), (torch.zeros(2, 1, 28, 28),)).module()  # 16 x 256 x 256 per image
    assert Classifier(program).batch_size == 2 ** 24 // (16 * 256 * 256) == 16
    assert batch_for(big) == 256  # a plain module records no shapes


def test_classifier_answers_class_names_and_probabilities(cnn):
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    table = Classifier(cnn, "fp32").predict(images)
    assert list(table.columns) == ["class", "probability", *CLASSES]
    p = table[list(CLASSES)].to_numpy()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    assert table["class"].tolist() == [CLASSES[i] for i in p.argmax(1)]
    np.testing.assert_allclose(table["probability"], p.max(1))
    with torch.no_grad():
        expected = cnn(torch.from_numpy(images)).softmax(1).numpy()
    np.testing.assert_allclose(p, expected, atol=1e-5)


@pytest.mark.parametrize("images,message", [
    (np.zeros((2, 28, 28), np.float32), "dtype float32 (0-1 floats? send (x * 255).round() as integers); expected "
                                        "uint8 pixel values 0-255"),
    (np.full((2, 28, 28), 300), "pixel values from 300 to 300 are out of range; expected uint8 pixel values 0-255"),
    (np.full((2, 28, 28), -1), "pixel values from -1 to -1 are out of range"),
    (np.zeros((2, 28), np.uint8), "shape (2, 28); expected uint8 pixel values 0-255 in (N, 28, 28)"),
    (np.zeros((2, 32, 32), np.uint8), "shape (2, 32, 32); expected"),
    (np.zeros((0, 28, 28), np.uint8), "empty (shape (0, 28, 28)); expected"),
    ([], "empty (shape (0,)); expected"),
    ("a picture", "text; expected uint8 pixel values"),
    ([[None] * 28] * 28, "null or mixed values; expected uint8"),
    ([[0, 1], [2]], "rows of different lengths; expected"),
])
def test_wrong_shapes_and_dtypes_are_refused_with_what_was_expected(images, message):
    with pytest.raises(InputError) as e:
        check_images(images, "batch.npy")
    assert message in str(e.value) and str(e.value).startswith("batch.npy: ")


def test_accepted_forms_become_a_uint8_batch():
    assert check_images(np.zeros((28, 28), np.uint8)).shape == (1, 28, 28)
    assert check_images(np.zeros((3, 1, 28, 28), np.uint8)).shape == (3, 28, 28)
    ints = check_images(np.full((2, 28, 28), 255, np.int64))  # what JSON from a REST client becomes
    assert ints.dtype == np.uint8 and ints.max() == 255


def test_read_images_from_png_jpeg_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "a.png")
    Image.fromarray(picture).convert("RGB").save(tmp_path / "b.JPG")
    np.save(tmp_path / "batch.npy", rng.integers(0, 256, (3, 28, 28), dtype=np.uint8))
    images, names = read_images([tmp_path / "a.png", tmp_path / "b.JPG", tmp_path / "batch.npy"])
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert names == [str(tmp_path / "a.png"), str(tmp_path / "b.JPG")] + [f"{tmp_path / 'batch.npy'}[{i}]"
                                                                          for i in range(3)]
    np.testing.assert_array_equal(images[0], picture)  # PNG is lossless; an RGB JPEG comes back grey


def test_read_images_refuses_bad_files_by_name(tmp_path):
    Image.fromarray(np.zeros((64, 48), np.uint8)).save(tmp_path / "big.png")
    np.save(tmp_path / "floats.npy", np.zeros((2, 28, 28), np.float64))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("hello")
    cases = {"big.png": "48x64 pixels, expected 28x28", "floats.npy": "dtype float64 (0-1 floats?",
             "broken.png": "not a readable image", "notes.txt": "unknown file type .txt",
             "missing.png": "no such file"}
    for name, message in cases.items():
        with pytest.raises(InputError) as e:
            read_images([tmp_path / name])
        assert str(e.value).startswith(str(tmp_path / name)) and message in str(e.value), str(e.value)
