"""Test metrics (scikit-learn) and figures (matplotlib): confusion matrices, learning curves, misclassified images."""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support  # noqa: E402


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


def misclassified_figure(images: np.ndarray, y_true, y_pred, classes, n: int = 36):
    wrong = np.flatnonzero(np.asarray(y_true) != np.asarray(y_pred))[:n]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"true {classes[y_true[i]]}\npred {classes[y_pred[i]]}", fontsize=7)
    fig.suptitle(f"First {len(wrong)} misclassified test images")
    fig.tight_layout()
    return fig


def write_report(out_dir: Path, images, y_true, y_pred, classes, epochs: list[dict[str, float]]) -> dict:
    """Write every evaluation artifact into out_dir and return the test metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    metrics = classification_metrics(y_true, y_pred, classes)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    normalized = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    (out_dir / "confusion_matrix.json").write_text(json.dumps(
        {"classes": list(classes), "counts": cm.tolist(), "normalized": normalized.round(4).tolist()}, indent=1))
    figures = {"confusion_matrix.png": confusion_figure(cm, classes, normalized=False),
               "confusion_matrix_normalized.png": confusion_figure(cm, classes, normalized=True),
               "curves.png": curves_figure(epochs),
               "misclassified.png": misclassified_figure(np.asarray(images), y_true, y_pred, classes)}
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
    rows = ["class,precision,recall,f1"] + [
        f"{c},{metrics[f'test_precision_{slug(c)}']:.4f},{metrics[f'test_recall_{slug(c)}']:.4f},"
        f"{metrics[f'test_f1_{slug(c)}']:.4f}" for c in classes]
    (out_dir / "per_class.csv").write_text("\n".join(rows) + "\n")
    return metrics
