"""The study's answer from MLflow itself, with its evidence.

Runs are chosen by a *validation* metric (never a test metric, which would make the test set part of model
selection): for each architecture and seed, its best finished run. Everything else is rebuilt from what those
runs logged: the per-image test predictions of their models, their training-split predictions and per-epoch
history. From them: per model, test accuracy and macro F1 with bootstrap intervals (mean ± std over seeds when
there are several), train vs test accuracy, calibration, convergence; per pair, the accuracy difference with a
paired-bootstrap interval and McNemar's exact test; and a verdict on each of the study's claims. fmnist.report
writes it all (Markdown, CSV, charts, one self-contained HTML page); the comparison is logged as a run.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fmnist import stats
from fmnist.data import CLASSES
from fmnist.errors import ConfigError, TrackingError
from fmnist.tracking import store

if TYPE_CHECKING:  # the pipeline pulls in the models; the comparison needs only the tracker's shape
    from fmnist.pipeline import Tracker

ORDER = ("ann", "cnn", "transfer")  # the study's story: no spatial features, learned ones, pretrained ones
PAIRS = (("cnn", "ann"), ("transfer", "cnn"), ("transfer", "ann"))  # (a, b): "a beats b"
SIMILAR = ("T-shirt/top", "Pullover", "Coat", "Shirt")  # the visually similar classes the study says gain most
PAIR_COLUMNS = ["pair", "a", "b", "seeds", "accuracy_a", "accuracy_b", "difference", "ci_low", "ci_high", "only_a_right",
                "only_b_right", "p_value", "per_seed_difference"]


@dataclass
class Evidence:
    """One architecture's compared runs, one per seed, as they were logged. Arrays are (seeds, images)."""
    arch: str
    runs: list[str]
    seeds: list[str]
    labels: np.ndarray  # (images,) test labels
    probabilities: np.ndarray  # (seeds, images, 10)
    train_correct: np.ndarray  # (seeds, training images) of 0/1, eval mode, no augmentation
    histories: list[pd.DataFrame]
    logged: list[dict]  # each run's logged metrics

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(-1)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels

    def logged_mean(self, name: str) -> float:
        return float(np.mean([m.get(name, np.nan) for m in self.logged]))


@dataclass
class Comparison:
    models: pd.DataFrame
    pairs: pd.DataFrame
    per_class: pd.DataFrame
    verdicts: list[dict]  # claim, verdict, evidence (one line of numbers)
    evidence: dict[str, Evidence]

    def headline(self) -> dict[str, float]:
        """Numbers for the study's parent run, so MLflow's runs table shows the answer."""
        out = {}
        for arch, row in self.models.iterrows():
            for column in ("test_accuracy", "test_macro_f1", "test_ece", "train_eval_accuracy", "generalization_gap",
                           "seconds_to_val_90"):
                if pd.notna(row[column]):
                    out[f"{arch}_{column}"] = float(row[column])
        for _, row in self.pairs.iterrows():
            out[f"{row['a']}_vs_{row['b']}_difference"] = float(row["difference"])
            out[f"{row['a']}_vs_{row['b']}_p_value"] = float(row["p_value"])
        return out


def best_runs(runs: pd.DataFrame, select: str = "best_val_accuracy") -> pd.DataFrame:
    """One row per (architecture, seed): the run with the highest `metrics.<select>`. Only seeds that every
    architecture has are kept, so that runs pair by seed; if none is shared, each architecture's best run. A run
    distilled from another model (train.teacher) is left out: the study compares what each architecture learns
    from the labels, and a taught MLP would otherwise win the ANN's place by its higher validation accuracy."""
    if "params.train.teacher" in runs:
        runs = runs[runs["params.train.teacher"].fillna("") == ""]
    if select.startswith("test_"):
        raise ConfigError(f"--select {select}: choosing by a test metric leaks the test set; use a validation "
                          "metric such as best_val_accuracy")
    column = f"metrics.{select}"
    needed = [column, "tags.architecture", "metrics.test_accuracy"]  # search trials have no test metrics
    if runs.empty or not set(needed) <= set(runs.columns) or runs.dropna(subset=needed).empty:
        raise ConfigError(f"no finished training runs with metric {select!r} and test metrics to compare")
    runs = runs.dropna(subset=needed).copy()
    runs["seed"] = runs.get("params.train.seed", pd.Series("0", index=runs.index)).fillna("0")
    best = runs.loc[runs.groupby(["tags.architecture", "seed"])[column].idxmax()]
    archs = [a for a in ORDER if a in set(best["tags.architecture"])] + \
        sorted(set(best["tags.architecture"]) - set(ORDER))
    shared = set.intersection(*(set(best.loc[best["tags.architecture"] == a, "seed"]) for a in archs))
    if shared:
        best = best[best["seed"].isin(shared)]
    else:  # different seeds per architecture: compare each one's best run, still on the same test images
        best = best.loc[best.groupby("tags.architecture")[column].idxmax()]
    best = best.assign(order=best["tags.architecture"].map(archs.index)).sort_values(["order", "seed"])
    return best.drop(columns="order")


def load_evidence(best: pd.DataFrame, folder: Path) -> dict[str, Evidence]:
    """Each chosen run's logged predictions and history, downloaded from the tracking store."""
    evidence = {}
    for arch, rows in best.groupby("tags.architecture", sort=False):
        tests, trains, histories = [], [], []
        for run_id in rows["run_id"]:
            local = store.download(run_id, "evaluation", folder / run_id)
            missing = [n for n in ("predictions.parquet", "train_predictions.parquet", "history.csv")
                       if not (local / n).is_file()]
            if missing:
                raise TrackingError(f"run {run_id} ({arch}) has no evaluation/{missing[0]}: it was logged by an "
                                    "older fmnist; train it again or leave it out with --filter")
            tests.append(pd.read_parquet(local / "predictions.parquet"))
            trains.append(pd.read_parquet(local / "train_predictions.parquet"))
            histories.append(pd.read_csv(local / "history.csv"))
        metrics = [{k.removeprefix("metrics."): v for k, v in row.items() if k.startswith("metrics.")}
                   for _, row in rows.iterrows()]
        evidence[arch] = Evidence(
            arch, list(rows["run_id"]), list(rows["seed"]), tests[0]["label"].to_numpy(),
            np.stack([t[list(CLASSES)].to_numpy() for t in tests]),
            np.stack([(t["predicted"] == t["label"]).to_numpy() for t in trains]), histories, metrics)
    return evidence


def models_table(evidence: dict[str, Evidence]) -> pd.DataFrame:
    rows, labels = {}, next(iter(evidence.values())).labels  # one test set
    f1_intervals = dict(zip(evidence, stats.macro_f1_ci(labels, *(e.predicted for e in evidence.values()))))
    for arch, e in evidence.items():
        accuracy, f1 = e.correct.mean(1), stats.macro_f1(e.labels, e.predicted)
        train = e.train_correct.mean(1)
        reached = [h.loc[h["val_accuracy"] >= 0.9] for h in e.histories]
        rows[arch] = {
            "seeds": len(e.seeds), "test_accuracy": accuracy.mean(), "test_accuracy_std": accuracy.std(ddof=1)
            if len(accuracy) > 1 else np.nan, **_ci("test_accuracy", stats.accuracy_ci(e.correct)),
            "test_macro_f1": f1.mean(), "test_macro_f1_std": f1.std(ddof=1) if len(f1) > 1 else np.nan,
            **_ci("test_macro_f1", f1_intervals[arch]),
            "train_eval_accuracy": train.mean(), "generalization_gap": (train - accuracy).mean(),
            "test_ece": e.logged_mean("test_ece"),
            "epochs_to_val_90": np.mean([r["epoch"].iloc[0] if len(r) else np.nan for r in reached]),
            "seconds_to_val_90": np.mean([r["elapsed_seconds"].iloc[0] if len(r) else np.nan for r in reached]),
            "parameters": e.logged_mean("params_count"), "training_seconds": e.logged_mean("train_seconds"),
            "runs": ",".join(r[:8] for r in e.runs)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


def pairs_table(evidence: dict[str, Evidence]) -> pd.DataFrame:
    """Each pair of the study: accuracy difference, paired-bootstrap interval, McNemar's exact test per seed
    (the reported p-value is the largest: every seed must show the difference for it to count)."""
    rows = []
    for a, b in PAIRS:
        if a not in evidence or b not in evidence:
            continue
        ca, cb = evidence[a].correct, evidence[b].correct
        tests = [stats.mcnemar_test(x, y) for x, y in zip(ca, cb)]
        per_seed = ca.mean(1) - cb.mean(1)
        low, high = stats.difference_ci(ca.astype(float), cb.astype(float))
        rows.append({"pair": f"{a} vs {b}", "a": a, "b": b, "seeds": len(ca), "accuracy_a": ca.mean(),
                     "accuracy_b": cb.mean(), "difference": per_seed.mean(), "ci_low": low, "ci_high": high,
                     "only_a_right": sum(t[1] for t in tests), "only_b_right": sum(t[2] for t in tests),
                     "p_value": max(t[0] for t in tests),
                     "per_seed_difference": " ".join(f"{d:+.4f}" for d in per_seed)})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def per_class_table(evidence: dict[str, Evidence]) -> pd.DataFrame:
    table = pd.DataFrame({arch: stats.macro_f1(e.labels, e.predicted, average="none").mean(0)
                          for arch, e in evidence.items()}, index=list(CLASSES))
    table.index.name = "class (test F1)"
    for new, old in (("cnn", "ann"), ("transfer", "cnn")):
        if {new, old} <= set(table.columns):
            table[f"{new} - {old} (points)"] = 100 * (table[new] - table[old])
    return table


def judge(evidence: dict[str, Evidence], pairs: pd.DataFrame, per_class: pd.DataFrame) -> list[dict]:
    """A verdict on each claim of the study that these runs can speak to."""
    out = []
    for _, row in pairs.iterrows():
        consistent = all(d > 0 for d in map(float, row["per_seed_difference"].split())) or \
            all(d < 0 for d in map(float, row["per_seed_difference"].split()))
        out.append({"claim": f"{row['a'].upper() if row['a'] != 'transfer' else 'Transfer'} beats "
                             f"{row['b'].upper() if row['b'] != 'transfer' else 'transfer'}",
                    "verdict": stats.verdict(row["ci_low"], row["ci_high"], row["p_value"], consistent),
                    "evidence": f"{100 * row['difference']:+.2f} points, 95 % CI [{100 * row['ci_low']:+.2f}, "
                                f"{100 * row['ci_high']:+.2f}], McNemar p = {row['p_value']:.2g} "
                                f"({row['only_a_right']} vs {row['only_b_right']} images only one got right)"
                                + _seeds(row["seeds"])})
    if {"cnn", "ann"} <= set(evidence):
        out.append(similar_classes(evidence["cnn"], evidence["ann"], per_class))
    if "transfer" in evidence and len(evidence) > 1:
        out += [converges_faster(evidence), generalises_better(evidence)]
    return out


def similar_classes(cnn: Evidence, ann: Evidence, per_class: pd.DataFrame) -> dict:
    group = [CLASSES.index(c) for c in SIMILAR]
    low, high = stats.class_gain_ci(cnn.labels, cnn.predicted, ann.predicted, group)
    gains = per_class["cnn - ann (points)"]
    top = list(gains.sort_values(ascending=False).index[:len(SIMILAR)])
    estimate = gains.iloc[group].mean() - gains.drop(gains.index[group]).mean()
    return {"claim": "The CNN's largest per-class gains over the ANN are on the visually similar classes "
                     "(shirt, T-shirt/top, pullover, coat)",
            "verdict": stats.verdict(low, high),
            "evidence": f"mean F1 gain on those 4 classes minus on the other 6: {estimate:+.2f} points, 95 % CI "
                        f"[{100 * low:+.2f}, {100 * high:+.2f}]; the 4 largest gains: {', '.join(top)} "
                        f"({sum(t in SIMILAR for t in top)} of 4 similar)" + _seeds(len(cnn.seeds))}


def converges_faster(evidence: dict[str, Evidence]) -> dict:
    """Training seconds to 90 % validation accuracy, transfer vs each other model, paired by seed (a model that
    never reaches 90 % counts as slower than any that does)."""
    def seconds(e: Evidence) -> list[float]:
        return [float(h.loc[h["val_accuracy"] >= 0.9, "elapsed_seconds"].iloc[0])
                if (h["val_accuracy"] >= 0.9).any() else np.inf for h in e.histories]

    transfer = seconds(evidence["transfer"])
    verdicts, parts = [], []
    for arch, e in evidence.items():
        if arch == "transfer":
            continue
        other = seconds(e)[:len(transfer)]
        ahead = [o - t if np.isfinite(o) or np.isfinite(t) else 0.0 for t, o in zip(transfer, other)]  # > 0: faster
        p = stats.seeds_p_value(ahead)
        sign = 1.0 if all(a > 0 for a in ahead) else -1.0 if all(a < 0 for a in ahead) else 0.0
        verdicts.append(stats.verdict(sign, sign, p))
        parts.append(f"transfer {_fmt(transfer)} vs {arch} {_fmt(other)}" + (f" (p = {p:.2g})" if p else ""))
    note = "" if len(transfer) > 1 else " (one seed: no estimate of the run-to-run variation; use -P seeds=3)"
    return {"claim": "Transfer learning converges faster (training seconds to 90 % validation accuracy)",
            "verdict": _all(verdicts), "evidence": "; ".join(parts) + _seeds(len(transfer)) + note}


def generalises_better(evidence: dict[str, Evidence]) -> dict:
    transfer = evidence["transfer"]
    verdicts, parts = [], []
    for arch, e in evidence.items():
        if arch == "transfer":
            continue
        n = min(len(transfer.correct), len(e.correct))  # seeds paired in order
        low, high = stats.gap_difference_ci(e.train_correct[:n].astype(float), transfer.train_correct[:n]
                                            .astype(float), e.correct[:n].astype(float),
                                            transfer.correct[:n].astype(float))
        gap = lambda x: float((x.train_correct.mean(1) - x.correct.mean(1)).mean())  # noqa: E731
        verdicts.append(stats.verdict(low, high))
        parts.append(f"gap {100 * gap(transfer):.2f} vs {arch} {100 * gap(e):.2f} points, {arch} minus transfer "
                     f"95 % CI [{100 * low:+.2f}, {100 * high:+.2f}]")
    return {"claim": "Transfer learning generalises better (a smaller train - test accuracy gap)",
            "verdict": _all(verdicts), "evidence": "; ".join(parts) + _seeds(len(transfer.seeds))}


def _all(verdicts: list[str]) -> str:
    """A claim against every other model holds if it holds against each, fails if it fails against any."""
    if stats.CONTRADICTED in verdicts:
        return stats.CONTRADICTED
    return stats.SUPPORTED if verdicts and all(v == stats.SUPPORTED for v in verdicts) else stats.INCONCLUSIVE


def _fmt(values: list[float]) -> str:
    shown = [("never" if not np.isfinite(v) else f"{v:.0f} s") for v in values]
    return shown[0] if len(shown) == 1 else "[" + ", ".join(shown) + "]"


def _seeds(n: int) -> str:
    return f"; {n} seeds" if n > 1 else ""


def _ci(name: str, interval: tuple[float, float]) -> dict[str, float]:
    return {f"{name}_ci_low": interval[0], f"{name}_ci_high": interval[1]}


def build(experiment: str, filter_string: str = "", select: str = "best_val_accuracy") -> Comparison:
    """The comparison of an experiment's runs (MLflow's search filter `filter_string`), from MLflow alone."""
    _, runs = store.finished_training_runs(experiment, filter_string)
    best = best_runs(runs, select)
    with tempfile.TemporaryDirectory() as tmp:
        evidence = load_evidence(best, Path(tmp))
    pairs, per_class = pairs_table(evidence), per_class_table(evidence)
    return Comparison(models_table(evidence), pairs, per_class, judge(evidence, pairs, per_class), evidence)


def compare(experiment: str, tracker: Tracker, filter_string: str = "", select: str = "best_val_accuracy",
            out_dir: Path = Path("outputs/comparison"), parent: str | None = None) -> tuple[str, Comparison, str]:
    """Build, write and log the comparison as a `comparison` run (nested under `parent` if given); returns
    (the Markdown, the comparison, the comparison run's id)."""
    from fmnist.report import write_report

    comparison = build(experiment, filter_string, select)
    markdown = write_report(out_dir, comparison)
    tags = {"fmnist.kind": "comparison", "selected_by": select}
    tags |= {f"compared.{arch}" + (f".seed{seed}" if len(e.seeds) > 1 else ""): run_id
             for arch, e in comparison.evidence.items() for seed, run_id in zip(e.seeds, e.runs)}
    with tracker.run("comparison", parent=parent, tags=tags) as run:
        run.log_artifacts(out_dir, "comparison")
        run.log_metrics(comparison.headline())
        return markdown, comparison, run.id
