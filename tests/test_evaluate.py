import json

import numpy as np
import pytest

import pandas as pd

from fmnist.evaluate import (classification_metrics, convergence, expected_calibration_error, slug,
                             write_evaluation)

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


def one_hot_ish(confidence: float, label: int, classes: int = 3) -> list[float]:
    """A probability row whose top class is `label` with probability `confidence`."""
    rest = (1 - confidence) / (classes - 1)
    return [confidence if k == label else rest for k in range(classes)]


def test_expected_calibration_error_matches_a_hand_computed_case():
    # Two predictions at confidence 0.9 (bin 14 of 15: 0.867-0.933), one right: |0.5 - 0.9| = 0.4, weight 2/4.
    # Two at 0.62 (bin 10: 0.6-0.667), both right: |1 - 0.62| = 0.38, weight 2/4. ECE = 0.2 + 0.19 = 0.39.
    p = np.array([one_hot_ish(0.9, 0), one_hot_ish(0.9, 1), one_hot_ish(0.62, 2), one_hot_ish(0.62, 0)])
    y = [0, 0, 2, 0]
    assert expected_calibration_error(p, y) == pytest.approx(0.39, abs=1e-6)
    perfect = np.array([one_hot_ish(0.75, 0)] * 4)  # right 3 times in 4 at confidence 0.75
    assert expected_calibration_error(perfect, [0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-6)


def test_expected_calibration_error_equals_torchmetrics_reference():
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (5000, 10))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.where(rng.random(5000) < 0.7, p.argmax(1), rng.integers(0, 10, 5000))
    reference = multiclass_calibration_error(torch.as_tensor(p), torch.as_tensor(y), num_classes=10, n_bins=15,
                                             norm="l1").item()
    assert expected_calibration_error(p, y) == pytest.approx(reference, abs=1e-6)


def test_convergence_is_the_first_epoch_reaching_90_percent():
    epochs = [{"val_accuracy": a, "elapsed_seconds": s} for a, s in ((0.85, 10.0), (0.91, 21.5), (0.89, 30.0))]
    assert convergence(epochs) == {"epochs_to_val_90": 2, "seconds_to_val_90": 21.5}
    assert convergence(epochs[:1]) == {}  # never reached: absent, not zero


def test_evaluation_writes_every_artifact_and_its_metrics(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 28, 28), dtype=np.uint8)
    epochs = [{"train_loss": 1.0, "val_loss": 1.1, "train_accuracy": 0.5, "val_accuracy": a, "elapsed_seconds": s}
              for a, s in ((0.4, 1.0), (0.95, 2.0))]
    p = np.array([one_hot_ish(0.8, k) for k in [0, 0, 1, 1, 2, 2]])
    metrics = write_evaluation(tmp_path, images, [0, 0, 0, 1, 1, 2], p, [0, 1, 1, 2], [0, 1, 2, 2], CLASSES, epochs)
    assert metrics["test_accuracy"] == pytest.approx(4 / 6)
    assert metrics["train_eval_accuracy"] == 0.75 and metrics["generalization_gap"] == pytest.approx(0.75 - 4 / 6)
    assert metrics["epochs_to_val_90"] == 2 and metrics["seconds_to_val_90"] == 2.0
    assert metrics["test_ece"] == pytest.approx(abs(4 / 6 - 0.8))  # every prediction in the 0.8 bin
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"confusion_matrix.json", "confusion_matrix.png", "confusion_matrix_normalized.png",
                     "curves.png", "misclassified.png", "per_class.csv", "predictions.parquet",
                     "train_predictions.parquet", "history.csv", "reliability_diagram.png"}
    cm = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert cm["counts"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cm["normalized"][0] == pytest.approx([2 / 3, 1 / 3, 0], abs=1e-4)
    assert (tmp_path / "per_class.csv").read_text().splitlines()[1] == "a,1.0000,0.6667,0.8000"
    table = pd.read_parquet(tmp_path / "predictions.parquet")
    assert list(table.columns) == ["index", "label", "predicted", *CLASSES] and table["predicted"].tolist() == \
        [0, 0, 1, 1, 2, 2]
