"""A search space (`tune.space` of experiments/<arch>.yaml) as Optuna samples it, and its values as overrides.

Each key is a `section.key` of the configuration; its spec is `{low, high[, log][, step]}` (an int or float range)
or `{choices: [...]}`. Optuna's categorical choices are scalars, so a list (CNN widths) travels as its YAML text
and is parsed back like any command-line override.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    import optuna


def suggest(trial: optuna.Trial, key: str, spec: dict):
    if "choices" in spec:
        return trial.suggest_categorical(key, [label(c) for c in spec["choices"]])
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if all(isinstance(v, int) for v in (low, high, spec.get("step", 1))):
        return trial.suggest_int(key, low, high, step=spec.get("step", 1), log=log)
    return trial.suggest_float(key, float(low), float(high), step=spec.get("step"), log=log)


def as_overrides(params: dict) -> list[str]:
    return [f"{key}={value}" for key, value in params.items()]


def label(value):
    """A configured value as Optuna holds it: a list as its YAML text."""
    if isinstance(value, (list, tuple)):
        return yaml.safe_dump(list(value), default_flow_style=True).strip()
    return value


def inside(value, spec: dict) -> bool:
    """Whether a configured value lies in the spec (a new study's trial 0 is the defaults, where they do)."""
    if "choices" in spec:
        return label(value) in [label(c) for c in spec["choices"]]
    return isinstance(value, (int, float)) and spec["low"] <= value <= spec["high"]
