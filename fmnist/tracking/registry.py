"""The model registry's policy: every trained model is a version of `fmnist-<arch>`, and the alias `champion`
names the version with the best validation accuracy (never the test accuracy: that would select on the test set).

Several runs can finish at once, so the alias is not moved by a read-then-write that a slower writer could undo:
each writer tags its version with its validation accuracy when it creates it, then sets the alias to the best
version it sees and looks again until what it sees agrees. Whoever writes last checks last, so the best version
wins whatever the order. Ties keep the older version: the champion moves only on a strictly better accuracy.
"""
from __future__ import annotations

import time

import mlflow
from mlflow.exceptions import MlflowException

CHAMPION = "champion"
VAL_TAG = "val_accuracy"


def register_model(model_uri: str, arch: str, val_accuracy: float) -> tuple[str, bool]:
    """Register `model_uri` as a new version of fmnist-<arch>; returns (version, whether it is the champion)."""
    name = f"fmnist-{arch}"
    version = mlflow.register_model(model_uri, name, tags={VAL_TAG: f"{val_accuracy:.6f}"}).version
    client = mlflow.MlflowClient()
    for _ in range(10):
        best = best_version(client, name)
        if current_champion(client, name) == best:
            break
        client.set_registered_model_alias(name, CHAMPION, best)
        time.sleep(0.2)  # then look again: a writer with an older view may have set it meanwhile
    return str(version), current_champion(client, name) == str(version)


def best_version(client: mlflow.MlflowClient, name: str) -> str | None:
    """The version with the highest validation accuracy tag; the oldest among equals."""
    scored = []
    for v in client.search_model_versions(f"name = '{name}'"):
        try:
            scored.append((-float(v.tags[VAL_TAG]), int(v.version)))
        except (KeyError, ValueError):
            continue  # registered by hand, without a validation accuracy: never the champion by this policy
    return str(min(scored)[1]) if scored else None


def current_champion(client: mlflow.MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None
