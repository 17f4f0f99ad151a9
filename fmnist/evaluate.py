"""A run's evaluation: test metrics (scikit-learn), calibration (expected calibration error and the reliability
diagram, from scipy's binned statistics), generalisation (train vs test accuracy), convergence (epochs and seconds to 90 % validation accuracy), the
per-image predictions, and figures (matplotlib).

Written into one folder that the run logs as `evaluation/`: predictions.parquet (index, label, predicted, one
probability column per class, from the logged model), train_predictions.parquet (index, label, predicted, from
the training code in eval mode), history.csv, per_class.csv, confusion matrices, curves, misclassified images and
the reliability diagram.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import binned_statistic  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support  # noqa: E402

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error and the reliability diagram
CONVERGED = 0.90  # the validation accuracy whose first epoch measures convergence speed


def slug(name: str) -> str:
    """'T-shirt/top' -> 't_shirt_top': class names as they appear in metric names."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def classification_metrics(y_true, y_pred, classes, prefix: str = "test_") -> dict[str, float]:
    """Accuracy, macro precision/recall/F1 and per-class precision/recall/F1, named `{prefix}...`."""
    labels = list(range(len(classes)))
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro",
                                                     zero_division=0)
    out = {f"{prefix}accuracy": accuracy_score(y_true, y_pred), f"{prefix}macro_precision": mp,
           f"{prefix}macro_recall": mr, f"{prefix}macro_f1": mf1}
    for i, name in enumerate(classes):
        s = slug(name)
        out |= {f"{prefix}precision_{s}": p[i], f"{prefix}recall_{s}": r[i], f"{prefix}f1_{s}": f1[i]}
    return {k: float(v) for k, v in out.items()}


def confusion_figure(cm: np.ndarray, classes, normalized: bool):
    values = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalized else cm
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(values, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true",
           title="Confusion matrix (share of each true class)" if normalized else "Confusion matrix (counts)")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    threshold = values.max() / 2
    for i in range(len(classes)):
        for j in range(len(classes)):
            text = f"{values[i, j]:.2f}" if normalized else f"{values[i, j]:d}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if values[i, j] > threshold else "black")
    fig.tight_layout()
    return fig


def curves_figure(epochs: list[dict[str, float]]):
    steps = range(1, len(epochs) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split in ("train", "val"):
            ax.plot(steps, [e[f"{split}_{metric}"] for e in epochs], marker="o", label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=f"train vs validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def misclassified_figure(images: np.ndarray, y_true, y_pred, classes, n: int = 36, cols: int = 6):
    """The first `n` misclassified test images as one mosaic (one image, not n axes: 4x faster to draw)."""
    wrong = np.flatnonzero(np.asarray(y_true) != np.asarray(y_pred))[:n]
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    cell = 28 + 12  # px per image plus room for its caption
    mosaic = np.full((rows * cell, cols * cell), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(cols * 1.9, rows * 2.1))
    for k, i in enumerate(wrong):
        r, c = divmod(k, cols)
        mosaic[r * cell + 12:r * cell + 40, c * cell + 6:c * cell + 34] = 255 - images[i]
        ax.text(c * cell + 20, r * cell + 11, f"true {classes[y_true[i]]}\npred {classes[y_pred[i]]}", fontsize=6.5,
                ha="center", va="bottom")
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255)
    ax.axis("off")
    ax.set_title(f"First {len(wrong)} misclassified test images")
    fig.tight_layout()
    return fig


def calibration_bins(probabilities: np.ndarray, y_true) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty confidence bin (ECE_BINS equal-width bins of the top-class probability): the mean confidence,
    the accuracy and the number of images."""
    confidence = probabilities.max(1)
    correct = (probabilities.argmax(1) == np.asarray(y_true)).astype(float)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    mean_confidence = binned_statistic(confidence, confidence, "mean", bins=edges).statistic
    accuracy = binned_statistic(confidence, correct, "mean", bins=edges).statistic
    count = binned_statistic(confidence, None, "count", bins=edges).statistic
    filled = count > 0
    return mean_confidence[filled], accuracy[filled], count[filled]


def expected_calibration_error(probabilities: np.ndarray, y_true) -> float:
    """Top-label ECE: |accuracy - confidence| of each confidence bin, weighted by the bin's share of the images.
    (tests/test_evaluate.py checks it against torchmetrics' multiclass_calibration_error.)"""
    confidence, accuracy, count = calibration_bins(probabilities, y_true)
    return float(np.average(np.abs(accuracy - confidence), weights=count))


def reliability_figure(probabilities: np.ndarray, y_true, title: str = "Reliability diagram (test set)"):
    confidence, accuracy, _ = calibration_bins(probabilities, y_true)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.plot(confidence, accuracy, marker="o", label="model")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{title}\nECE {expected_calibration_error(probabilities, y_true):.4f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def convergence(epochs: list[dict[str, float]], threshold: float = CONVERGED) -> dict[str, float]:
    """The first epoch whose validation accuracy reaches `threshold` and the training seconds by then; empty if
    none does (the metrics are then absent, not zero)."""
    for epoch, metrics in enumerate(epochs, start=1):
        if metrics["val_accuracy"] >= threshold:
            return {f"epochs_to_val_{threshold * 100:.0f}": epoch,
                    f"seconds_to_val_{threshold * 100:.0f}": metrics["elapsed_seconds"]}
    return {}


def predictions_table(probabilities: np.ndarray, y_true, classes) -> pd.DataFrame:
    table = pd.DataFrame(probabilities, columns=list(classes))
    table.insert(0, "predicted", probabilities.argmax(1))
    table.insert(0, "label", np.asarray(y_true))
    table.insert(0, "index", np.arange(len(table)))
    return table


def write_evaluation(out_dir: Path, images, y_true, probabilities: np.ndarray, train_true, train_pred, classes,
                     epochs: list[dict[str, float]]) -> dict[str, float]:
    """Write every evaluation artifact into out_dir and return the run's test, calibration, generalisation and
    convergence metrics. `probabilities` come from the logged model, `train_pred` from the training code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true, y_pred = np.asarray(y_true), probabilities.argmax(1)
    metrics = classification_metrics(y_true, y_pred, classes)
    train_accuracy = accuracy_score(train_true, train_pred)
    metrics |= {"test_ece": expected_calibration_error(probabilities, y_true), "train_eval_accuracy": train_accuracy,
                "generalization_gap": train_accuracy - metrics["test_accuracy"], **convergence(epochs)}
    predictions_table(probabilities, y_true, classes).to_parquet(out_dir / "predictions.parquet", index=False)
    pd.DataFrame({"index": np.arange(len(train_true)), "label": np.asarray(train_true),
                  "predicted": np.asarray(train_pred)}).to_parquet(out_dir / "train_predictions.parquet", index=False)
    pd.DataFrame(epochs, index=pd.RangeIndex(1, len(epochs) + 1, name="epoch")).to_csv(out_dir / "history.csv")
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    normalized = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    (out_dir / "confusion_matrix.json").write_text(json.dumps(
        {"classes": list(classes), "counts": cm.tolist(), "normalized": normalized.round(4).tolist()}, indent=1))
    figures = {"confusion_matrix.png": confusion_figure(cm, classes, normalized=False),
               "confusion_matrix_normalized.png": confusion_figure(cm, classes, normalized=True),
               "curves.png": curves_figure(epochs),
               "misclassified.png": misclassified_figure(np.asarray(images), y_true, y_pred, classes),
               "reliability_diagram.png": reliability_figure(probabilities, y_true)}
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
    rows = ["class,precision,recall,f1"] + [
        f"{c},{metrics[f'test_precision_{slug(c)}']:.4f},{metrics[f'test_recall_{slug(c)}']:.4f},"
        f"{metrics[f'test_f1_{slug(c)}']:.4f}" for c in classes]
    (out_dir / "per_class.csv").write_text("\n".join(rows) + "\n")
    return metrics
