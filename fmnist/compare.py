"""The study's answer from MLflow itself: the best run of each architecture, compared on the test set.

The best run per architecture is chosen by a *validation* metric (never by a test metric, which would make the
test set part of model selection). Tables go to the console and to Markdown, CSV and HTML files with a bar chart;
`fmnist compare` logs them as artifacts of a `comparison` run tagged with the runs it compared.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fmnist import tracking  # noqa: E402
from fmnist.data import CLASSES  # noqa: E402
from fmnist.evaluate import slug  # noqa: E402

ORDER = ("ann", "cnn", "transfer")  # the study's story: no spatial features, learned ones, pretrained ones
SUMMARY = {  # column -> run metric
    "test accuracy": "test_accuracy", "macro F1": "test_macro_f1", "macro precision": "test_macro_precision",
    "macro recall": "test_macro_recall", "parameters": "params_count", "training seconds": "train_seconds",
}
SIMILAR = ("Shirt", "T-shirt/top", "Pullover", "Coat")  # the classes the study says gain most


def best_runs(runs: pd.DataFrame, select: str = "best_val_accuracy") -> pd.DataFrame:
    """One row per architecture: its run with the highest `metrics.<select>`, in the study's order."""
    column = f"metrics.{select}"
    if select.startswith("test_"):
        raise ValueError(f"--select {select}: choosing by a test metric leaks the test set; use a validation "
                         "metric such as best_val_accuracy")
    needed = [column, "tags.architecture", "metrics.test_accuracy"]  # search trials have no test metrics
    if runs.empty or not set(needed) <= set(runs.columns) or runs.dropna(subset=needed).empty:
        raise ValueError(f"no finished training runs with metric {select!r} and test metrics to compare")
    runs = runs.dropna(subset=needed)
    best = runs.loc[runs.groupby("tags.architecture")[column].idxmax()].set_index("tags.architecture")
    return best.loc[[a for a in ORDER if a in best.index] + sorted(set(best.index) - set(ORDER))]


def summary_table(best: pd.DataFrame) -> pd.DataFrame:
    table = pd.DataFrame({name: best[f"metrics.{metric}"] for name, metric in SUMMARY.items()})
    table.index.name = "model"
    if "ann" in table.index:
        table["vs ANN (points)"] = 100 * (table["test accuracy"] - table.loc["ann", "test accuracy"])
    table["run"] = best["run_id"].str[:8]
    return table


def per_class_table(best: pd.DataFrame) -> pd.DataFrame:
    table = pd.DataFrame({c: best[f"metrics.test_f1_{slug(c)}"] for c in CLASSES}).T
    table.index.name = "class (test F1)"
    for new, old in (("cnn", "ann"), ("transfer", "cnn")):
        if {new, old} <= set(table.columns):
            table[f"{new} - {old} (points)"] = 100 * (table[new] - table[old])
    return table


def bar_chart(per_class: pd.DataFrame):
    models = [c for c in per_class.columns if "(points)" not in c]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        ax.bar([x + i * width for x in range(len(per_class))], per_class[model], width, label=model)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(per_class))], per_class.index,
                  rotation=30, ha="right")
    ax.set(ylabel="test F1", ylim=(max(0.0, per_class[models].min().min() - 0.05), 1.0),
           title="Per-class test F1 of the best run of each architecture")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_report(out_dir: Path, summary: pd.DataFrame, per_class: pd.DataFrame) -> str:
    """Markdown, CSV, HTML and a PNG chart into out_dir; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = {"parameters": "{:,.0f}", "training seconds": "{:.0f}"}
    shown = summary.copy()
    for column in shown.columns:
        if column != "run":
            shown[column] = shown[column].map(fmt.get(column, "{:.4f}" if "points" not in column else "{:+.2f}")
                                              .format)
    per_class_shown = per_class.map(lambda v: f"{v:.4f}")
    for column in (c for c in per_class.columns if "(points)" in c):
        per_class_shown[column] = per_class[column].map("{:+.2f}".format)
    # disable_numparse: tabulate would otherwise re-read the formatted strings as numbers and drop the digits
    markdown = (shown.to_markdown(disable_numparse=True) + "\n\n"
                + per_class_shown.to_markdown(disable_numparse=True) + "\n")
    (out_dir / "comparison.md").write_text(markdown)
    summary.to_csv(out_dir / "comparison.csv")
    per_class.to_csv(out_dir / "per_class_f1.csv")
    (out_dir / "comparison.html").write_text(
        "<html><head><meta charset='utf-8'><title>fmnist: ANN vs CNN vs transfer</title></head><body>"
        "<h1>ANN vs CNN vs transfer learning on Fashion-MNIST</h1>" + shown.to_html() + "<h2>Per-class test F1</h2>"
        + per_class_shown.to_html() + "<img src='per_class_f1.png' alt='per-class F1 bar chart'></body></html>")
    fig = bar_chart(per_class)
    fig.savefig(out_dir / "per_class_f1.png", dpi=110)
    plt.close(fig)
    return markdown


def compare(experiment: str, filter_string: str = "", select: str = "best_val_accuracy",
            out_dir: Path = Path("outputs/comparison"), parent_run_id: str | None = None) -> tuple[str, str]:
    """Build, write and log the comparison (nested under `parent_run_id` if given); returns (Markdown, the
    comparison run's id)."""
    best = best_runs(tracking.finished_training_runs(experiment, filter_string), select)
    markdown = write_report(out_dir, summary_table(best), per_class_table(best))
    run_id = tracking.log_comparison(experiment, out_dir, dict(zip(best.index, best["run_id"])), select,
                                     parent_run_id)
    return markdown, run_id
