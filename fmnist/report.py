"""The comparison written out: Markdown (printed, and comparison.md), CSV tables, verdicts.md, four charts and
report.html, one self-contained page (every chart embedded as a data URI, no external reference), so it renders
inside the MLflow UI's artifact viewer."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from fmnist.compare import Comparison, Evidence  # noqa: E402
from fmnist.evaluate import calibration_bins  # noqa: E402

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.supported{color:#176d2c;font-weight:bold}.contradicted{color:#a11;font-weight:bold}
.inconclusive{color:#8a6d00;font-weight:bold}li{margin:.5em 0}"""


def estimate(row: pd.Series, name: str, scale: float = 1.0, digits: int = 4) -> str:
    """`0.9372 ± 0.0010 [0.9320, 0.9418]`: mean, std over seeds (if several) and the 95 % interval."""
    text = f"{scale * row[name]:.{digits}f}"
    if pd.notna(row.get(f"{name}_std")):
        text += f" ± {scale * row[f'{name}_std']:.{digits}f}"
    return text + f" [{scale * row[f'{name}_ci_low']:.{digits}f}, {scale * row[f'{name}_ci_high']:.{digits}f}]"


def models_shown(models: pd.DataFrame) -> pd.DataFrame:
    never = lambda v, fmt: "never" if pd.isna(v) else fmt.format(v)  # noqa: E731
    return pd.DataFrame({
        "seeds": models["seeds"],
        "test accuracy [95 % CI]": [estimate(r, "test_accuracy") for _, r in models.iterrows()],
        "macro F1 [95 % CI]": [estimate(r, "test_macro_f1") for _, r in models.iterrows()],
        "train accuracy": models["train_eval_accuracy"].map("{:.4f}".format),
        "gap (points)": (100 * models["generalization_gap"]).map("{:+.2f}".format),
        "ECE": models["test_ece"].map("{:.4f}".format),
        "epochs to 90 %": models["epochs_to_val_90"].map(lambda v: never(v, "{:.1f}")),
        "seconds to 90 %": models["seconds_to_val_90"].map(lambda v: never(v, "{:.0f}")),
        "parameters": models["parameters"].map("{:,.0f}".format),
        "training s": models["training_seconds"].map("{:.0f}".format),
        "runs": models["runs"]}, index=models.index)


def pairs_shown(pairs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "difference (points) [95 % CI]": [f"{100 * r.difference:+.2f} [{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]"
                                          for r in pairs.itertuples()],
        "McNemar p": pairs["p_value"].map("{:.2g}".format).to_numpy(),
        "only a right": pairs["only_a_right"].to_numpy(), "only b right": pairs["only_b_right"].to_numpy(),
        "per seed": pairs["per_seed_difference"].to_numpy()}, index=pd.Index(pairs["pair"], name="pair (a vs b)"))


def per_class_shown(per_class: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: per_class[c].map("{:+.2f}".format if "(points)" in c else "{:.4f}".format)
                         for c in per_class.columns}, index=per_class.index)


def per_class_figure(per_class: pd.DataFrame):
    models = [c for c in per_class.columns if "(points)" not in c]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        ax.bar([x + i * width for x in range(len(per_class))], per_class[model], width, label=model)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(per_class))], per_class.index,
                  rotation=30, ha="right")
    ax.set(ylabel="test F1", ylim=(max(0.0, per_class[models].min().min() - 0.05), 1.0),
           title="Per-class test F1 of each model")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def train_vs_test_figure(models: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(models))
    ax.bar(x - 0.2, models["train_eval_accuracy"], 0.4, label="training split (eval mode)")
    error = [models["test_accuracy"] - models["test_accuracy_ci_low"],
             models["test_accuracy_ci_high"] - models["test_accuracy"]]
    ax.bar(x + 0.2, models["test_accuracy"], 0.4, yerr=error, capsize=4, label="test (95 % CI)")
    ax.set_xticks(x, models.index)
    low = min(models["test_accuracy_ci_low"].min(), models["train_eval_accuracy"].min())
    ax.set(ylabel="accuracy", ylim=(max(0.0, low - 0.03), 1.0), title="Train vs test accuracy (the gap)")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def convergence_figure(evidence: dict[str, Evidence]):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for color, (arch, e) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], evidence.items()):
        for i, h in enumerate(e.histories):
            label = arch if i == 0 else None
            axes[0].plot(h["epoch"], h["val_accuracy"], marker="o", ms=3, color=color, label=label, alpha=0.8)
            axes[1].plot(h["elapsed_seconds"], h["val_accuracy"], marker="o", ms=3, color=color, label=label,
                         alpha=0.8)
    for ax, xlabel in zip(axes, ("epoch", "training seconds")):
        ax.axhline(0.9, color="grey", ls="--", lw=1)
        ax.set(xlabel=xlabel, title=f"validation accuracy vs {xlabel}")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("validation accuracy")
    fig.tight_layout()
    return fig


def reliability_figure(evidence: dict[str, Evidence], models: pd.DataFrame):
    fig, axes = plt.subplots(1, len(evidence), figsize=(4.2 * len(evidence), 4.2), squeeze=False)
    for ax, (arch, e) in zip(axes[0], evidence.items()):
        ax.plot([0, 1], [0, 1], "--", color="grey")
        for p in e.probabilities:
            confidence, accuracy, _ = calibration_bins(p, e.labels)
            ax.plot(confidence, accuracy, marker="o", ms=3)
        ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
               title=f"{arch}: ECE {models.loc[arch, 'test_ece']:.4f}")
        ax.grid(alpha=0.3)
    fig.suptitle("Reliability diagrams (test set)")
    fig.tight_layout()
    return fig


def verdicts_markdown(verdicts: list[dict]) -> str:
    return "\n".join(f"- **{v['claim']}**: {v['verdict']}. {v['evidence']}." for v in verdicts) + "\n"


def write_report(out_dir: Path, c: Comparison) -> str:
    """Every file of the report into out_dir; returns the Markdown that is also printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models, pairs, per_class = models_shown(c.models), pairs_shown(c.pairs), per_class_shown(c.per_class)
    # disable_numparse: tabulate would otherwise re-read the formatted strings as numbers and drop the digits
    markdown = "\n\n".join([
        "## Models\n\n" + models.to_markdown(disable_numparse=True),
        "## Pairs\n\n" + (pairs.to_markdown(disable_numparse=True) if len(pairs) else "(one model: no pairs)"),
        "## Verdicts on the study's claims\n\n" + verdicts_markdown(c.verdicts),
        "## Per-class test F1\n\n" + per_class.to_markdown(disable_numparse=True)]) + "\n"
    (out_dir / "comparison.md").write_text(markdown)
    (out_dir / "verdicts.md").write_text(verdicts_markdown(c.verdicts))
    c.models.to_csv(out_dir / "comparison.csv")
    c.pairs.to_csv(out_dir / "pairs.csv", index=False)
    c.per_class.to_csv(out_dir / "per_class_f1.csv")
    figures = {"per_class_f1.png": per_class_figure(c.per_class), "train_vs_test.png": train_vs_test_figure(c.models),
               "convergence.png": convergence_figure(c.evidence),
               "reliability.png": reliability_figure(c.evidence, c.models)}
    images = {}
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        images[name] = base64.b64encode((out_dir / name).read_bytes()).decode()
    (out_dir / "report.html").write_text(html_page(models, pairs, per_class, c.verdicts, images))
    return markdown


def html_page(models: pd.DataFrame, pairs: pd.DataFrame, per_class: pd.DataFrame, verdicts: list[dict],
              images: dict[str, str]) -> str:
    def figure(name: str, alt: str) -> str:
        return f'<p><img alt="{alt}" src="data:image/png;base64,{images[name]}"></p>'

    items = "".join(f'<li><b>{html.escape(v["claim"])}</b>: <span class="{v["verdict"].split()[0]}">'
                    f'{html.escape(v["verdict"])}</span>. {html.escape(v["evidence"])}.</li>' for v in verdicts)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fmnist: ANN vs CNN vs transfer</title>"
            f"<style>{STYLE}</style></head><body><h1>ANN vs CNN vs transfer learning on Fashion-MNIST</h1>"
            f"<h2>Verdicts on the study's claims</h2><ul>{items}</ul>"
            f"<h2>Models</h2>{models.to_html()}{figure('train_vs_test.png', 'train vs test accuracy')}"
            f"<h2>Pairs</h2>{pairs.to_html() if len(pairs) else '<p>one model: no pairs</p>'}"
            f"<h2>Convergence</h2>{figure('convergence.png', 'validation accuracy vs epoch and seconds')}"
            f"<h2>Calibration</h2>{figure('reliability.png', 'reliability diagrams')}"
            f"<h2>Per-class test F1</h2>{per_class.to_html()}{figure('per_class_f1.png', 'per-class F1')}"
            "<p>Intervals: seeded percentile bootstrap over the test images (1,000 resamples); p-values: "
            "McNemar's exact test on paired predictions (the largest over seeds).</p></body></html>")
