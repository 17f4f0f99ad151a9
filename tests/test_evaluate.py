import json

import numpy as np
import pytest

from fmnist.evaluate import classification_metrics, slug, write_report

CLASSES = ["a", "b", "c"]


def test_metrics_match_hand_computed_values():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y_true, y_pred, CLASSES)
    # class a: tp 2, fp 0, fn 1 -> p 1, r 2/3; b: tp 1, fp 1, fn 1 -> p 1/2, r 1/2; c: tp 1, fp 1, fn 0 -> p 1/2, r 1
    assert m["test_accuracy"] == pytest.approx(4 / 6)
    assert m["test_precision_a"] == 1 and m["test_recall_a"] == pytest.approx(2 / 3)
    assert m["test_f1_a"] == pytest.approx(0.8) and m["test_f1_b"] == pytest.approx(0.5)
    assert m["test_f1_c"] == pytest.approx(2 / 3)
    assert m["test_macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["test_macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["test_macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_class_names_become_metric_safe():
    assert slug("T-shirt/top") == "t_shirt_top" and slug("Ankle boot") == "ankle_boot"


def test_report_writes_every_artifact(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 28, 28), dtype=np.uint8)
    epochs = [{"train_loss": 1.0, "val_loss": 1.1, "train_accuracy": 0.5, "val_accuracy": 0.4}] * 2
    metrics = write_report(tmp_path, images, [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], CLASSES, epochs)
    assert metrics["test_accuracy"] == pytest.approx(4 / 6)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"confusion_matrix.json", "confusion_matrix.png", "confusion_matrix_normalized.png",
                     "curves.png", "misclassified.png", "per_class.csv"}
    cm = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert cm["counts"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cm["normalized"][0] == pytest.approx([2 / 3, 1 / 3, 0], abs=1e-4)
    assert (tmp_path / "per_class.csv").read_text().splitlines()[1] == "a,1.0000,0.6667,0.8000"
