"""`mlflow run . -e main -P seeds=2` against the real test server: every architecture once per seed as nested
runs, then a comparison of exactly those (mean ± std over seeds, paired tests, verdicts), each model registered
and rescoring the test set to its run's accuracy when loaded back, the answer on the parent run."""
import subprocess

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import ROOT
from fmnist import data as fdata
from fmnist.data import CLASSES

pytestmark = pytest.mark.slow


def test_main_entry_point_trains_all_three_per_seed_and_compares_exactly_its_runs(tracking_env, tiny_data, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the transfer activation cache
    client = MlflowClient()
    exp = client.create_experiment("study")
    # An earlier run of the same experiment, better on validation: outside the study, so never compared.
    decoy = client.create_run(exp, tags={"architecture": "cnn"}).info.run_id
    client.log_metric(decoy, "best_val_accuracy", 0.999)
    client.set_terminated(decoy, "FINISHED")

    out = subprocess.run(["mlflow", "run", str(ROOT), "-e", "main", "--env-manager", "local", "--experiment-name",
                          "study", "-P", "epochs=1", "-P", "seeds=2", "-P", f"data_dir={tiny_data}"],
                         capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    [parent] = client.search_runs([exp], "tags.`fmnist.kind` = 'study'")
    assert parent.info.status == "FINISHED" and parent.data.tags["study.architectures"] == "ann,cnn,transfer"
    assert parent.data.tags["study.seeds"] == "0,1"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    training = {(r.data.tags["architecture"], r.data.params["train.seed"]): r for r in children
                if "architecture" in r.data.tags}
    [comparison] = [r for r in children if r.data.tags.get("fmnist.kind") == "comparison"]
    assert len(children) == 7 and set(training) == {(a, s) for a in ("ann", "cnn", "transfer") for s in "01"}
    assert all(r.info.status == "FINISHED" for r in children)
    assert {k: v for k, v in comparison.data.tags.items() if k.startswith("compared.")} == \
        {f"compared.{arch}.seed{seed}": r.info.run_id for (arch, seed), r in training.items()}
    assert decoy not in comparison.data.tags.values()
    assert {"comparison/comparison.md", "comparison/report.html", "comparison/pairs.csv",
            "comparison/verdicts.md"} <= {a.path for a in client.list_artifacts(comparison.info.run_id, "comparison")}
    test = fdata.load(tiny_data, 0.1, seed=0)  # the test set is the same for every seed
    for (arch, seed), run in training.items():
        [version] = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        assert version.name == f"fmnist-{arch}"
        assert client.get_model_version_by_alias(f"fmnist-{arch}", "champion")  # every model has one
        if seed == "0":  # the registered model, loaded back, rescores the test set to its run's accuracy
            table = mlflow.pyfunc.load_model(f"models:/fmnist-{arch}/{version.version}").predict(test.x_test.numpy())
            assert (table["class"] == [CLASSES[k] for k in test.y_test]).mean() == \
                run.data.metrics["test_accuracy"], arch
    for arch in ("ann", "cnn", "transfer"):  # the answer on the parent run: the mean over the seeds
        mean = sum(training[(arch, s)].data.metrics["test_accuracy"] for s in "01") / 2
        assert parent.data.metrics[f"{arch}_test_accuracy"] == pytest.approx(mean)
    assert "cnn_vs_ann_p_value" in parent.data.metrics
    table = out.stdout.split("## Models")[1].split("## Pairs")[0]
    assert "| transfer" in table and " ± " in table and "## Verdicts on the study's claims" in out.stdout
    assert "study run " + parent.info.run_id in out.stdout
