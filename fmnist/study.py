"""The study: every architecture trained once per seed as nested runs of one parent run, then the comparison of
exactly those runs (MLproject's `main` entry point, `fmnist study`). The parent run carries the answer as metrics
(`<arch>_test_accuracy`, `cnn_vs_ann_p_value`, ...), so MLflow's runs table shows it without opening anything."""
from __future__ import annotations

from pathlib import Path

from fmnist import data as fdata
from fmnist.compare import compare
from fmnist.config import load_config
from fmnist.pipeline import Tracker, run_experiment


def study_filter(parent_run_id: str) -> str:
    """The search filter that selects exactly the runs of one study (its children)."""
    return f"tags.mlflow.parentRunId = '{parent_run_id}'"


def run_study(archs: list[str], seeds: list[int], overrides: list[str], tracker: Tracker,
              out_dir: Path) -> tuple[str, str]:
    """Returns (the comparison's Markdown, the study run's id). Every configuration is validated before the first
    run starts."""
    configs = [load_config(arch, None, [*overrides, f"train.seed={seed}"]) for seed in seeds for arch in archs]
    tags = {"fmnist.kind": "study", "study.architectures": ",".join(archs), "study.seeds": ",".join(map(str, seeds))}
    with tracker.run("study", tags=tags) as parent:
        datasets = {}
        for cfg in configs:
            arch, seed = cfg.model.arch, cfg.train.seed
            cfg.tracking.run_name = cfg.tracking.run_name or (arch if len(seeds) == 1 else f"{arch}-seed{seed}")
            key = (cfg.data.data_dir, cfg.data.val_fraction, seed)  # the split follows the seed
            if key not in datasets:
                datasets[key] = fdata.load(*key)
            run_experiment(cfg, tracker, datasets[key], parent=parent.id)
        markdown, comparison, _ = compare(tracker.experiment, tracker, study_filter(parent.id), out_dir=out_dir,
                                          parent=parent.id)
        parent.log_metrics(comparison.headline())
        return markdown, parent.id


def parse_seeds(text: str, base: int = 0) -> list[int]:
    """`3` -> three seeds from `base` (0, 1, 2); `0,4,7` -> those; empty -> [base]."""
    from fmnist.errors import ConfigError

    text = text.strip()
    try:
        if not text:
            return [base]
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(base, base + int(text)))
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: expected a count (3 means seeds 0, 1, 2) or distinct seeds >= 0 "
                          "separated by commas (0,4,7)")
    return seeds
