"""The whole pipeline offline, in seconds: tiny data, tracking switched off (NullTracker), every architecture."""
import numpy as np
import pandas as pd
import pytest
import torch

from fmnist import data as fdata
from fmnist.config import load_config
from fmnist.errors import ConfigError, Diverged
from fmnist.pipeline import NullTracker, run_experiment, with_teacher
from fmnist.predict import Classifier
from fmnist.errors import Pruned

SMALL = {"ann": ["model.widths=[32]"], "cnn": ["model.widths=[8,16]", "model.convs_per_block=1"],
         "transfer": ["model.resolution=32", "model.unfrozen_blocks=1"]}
EVALUATION = {"confusion_matrix.json", "confusion_matrix.png", "confusion_matrix_normalized.png", "curves.png",
              "history.csv", "misclassified.png", "per_class.csv", "predictions.parquet", "reliability_diagram.png",
              "train_predictions.parquet"}


def config(arch, tiny_data, *extra):
    return load_config(arch, overrides=["train.epochs=3", f"data.data_dir={tiny_data}", *SMALL[arch], *extra])


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


@pytest.mark.parametrize("arch", ["ann", "transfer"])
def test_a_run_logs_its_config_metrics_evaluation_and_model(arch, tiny_data, cold_cache, tmp_path):
    tracker = NullTracker()
    outcome = run_experiment(config(arch, tiny_data), tracker)
    [run] = tracker.runs
    assert run.status == "FINISHED" and outcome.run_id == run.id
    assert run.params["train.epochs"] == 3 and run.params["model.arch"] == arch
    assert run.params["train.weight_decay"] == 0.05  # a shared default, resolved and logged
    assert [step for step, _ in run.metrics["val_accuracy"]] == [1, 2, 3]
    m = {k: v[-1][1] for k, v in run.metrics.items()}
    assert m["test_accuracy"] > 0.3 and 0 <= m["test_ece"] <= 1  # chance is 0.1
    assert m["generalization_gap"] == pytest.approx(m["train_eval_accuracy"] - m["test_accuracy"])
    assert set(run.artifacts["evaluation"]) == EVALUATION
    assert run.registered == (arch, outcome.history.best_val_accuracy)
    assert run.tags["architecture"] == arch and run.tags["mlflow.note.content"].startswith(f"{arch} (")
    if arch == "transfer":
        assert run.tags["feature_cache"] == "miss" and m["params_trained"] < m["params_count"]

    # The logged program re-scores the test set to exactly the logged accuracy.
    data = fdata.load(tiny_data, 0.1, seed=0)
    p = Classifier.load(run.model).probabilities(data.x_test.numpy())
    assert (p.argmax(1) == data.y_test.numpy()).mean() == m["test_accuracy"]


def test_the_evaluation_files_hold_predictions_of_the_logged_model(tiny_data, tmp_path):
    tracker = NullTracker(tmp_path)
    run_experiment(config("ann", tiny_data), tracker)
    [run] = tracker.runs
    evaluation = run.folder / "evaluation"
    table = pd.read_parquet(evaluation / "predictions.parquet")
    assert list(table.columns[:3]) == ["index", "label", "predicted"] and len(table) == 200
    probabilities = table.iloc[:, 3:].to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    assert (table["predicted"] == probabilities.argmax(1)).all()
    assert (table["predicted"] == table["label"]).mean() == run.metrics["test_accuracy"][-1][1]
    train = pd.read_parquet(evaluation / "train_predictions.parquet")
    assert len(train) == 540 and (train["predicted"] == train["label"]).mean() == \
        run.metrics["train_eval_accuracy"][-1][1]
    history = pd.read_csv(evaluation / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3] and (history["elapsed_seconds"].diff().dropna() > 0).all()


def test_a_trial_stops_after_validation_and_a_pruned_one_ends_finished(tiny_data):
    tracker = NullTracker()
    outcome = run_experiment(config("ann", tiny_data), tracker, trial=True, tags={"optuna.trial": "0"})
    [run] = tracker.runs
    assert run.tags["trial_state"] == "COMPLETE" and run.model is None and run.registered is None
    assert "test_accuracy" not in run.metrics and outcome.metrics["best_val_accuracy"] > 0.1

    class PruneAtTwo:
        def on_epoch_end(self, epoch, metrics):
            if epoch == 2:
                raise Pruned("pruned")

    with pytest.raises(Pruned):
        run_experiment(config("ann", tiny_data), tracker, trial=True, callbacks=[PruneAtTwo()])
    assert tracker.runs[1].status == "FINISHED" and tracker.runs[1].tags["trial_state"] == "PRUNED"
    assert len(tracker.runs[1].metrics["val_accuracy"]) == 2


def test_a_diverging_run_ends_failed_names_the_epoch_and_registers_nothing(tiny_data):
    cfg = config("ann", tiny_data)
    cfg.train.lr = 1e30  # past validation (which refuses lr > 10): what a too high but accepted rate does
    tracker = NullTracker()
    with pytest.raises(Diverged, match=r"train.lr=1e\+30: the training loss became nan in epoch 1; the learning "
                                       r"rate is likely too high"):
        run_experiment(cfg, tracker)
    [run] = tracker.runs
    assert run.status == "FAILED" and run.registered is None and run.model is None


def test_same_seed_gives_the_same_run_whatever_the_global_random_state(tiny_data):
    """Initial weights, split, shuffling, augmentation and dropout all follow train.seed."""
    metrics = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # what an earlier computation in the same process leaves behind
        tracker = NullTracker()
        run_experiment(config("cnn", tiny_data, "train.augment=true"), tracker)
        metrics.append({k: v[-1][1] for k, v in tracker.runs[0].metrics.items() if "seconds" not in k})
    assert metrics[0] == metrics[1]
    other = NullTracker()
    run_experiment(config("cnn", tiny_data, "train.augment=true", "train.seed=1"), other)
    assert other.runs[0].metrics["val_loss"] != metrics[0]["val_loss"]


def test_an_ann_distils_from_a_saved_cnn_and_a_bad_teacher_leaves_no_run(tiny_data, tmp_path):
    teacher_tracker = NullTracker(tmp_path / "teacher")
    run_experiment(config("cnn", tiny_data), teacher_tracker)
    network = teacher_tracker.runs[0].model
    tracker = NullTracker(tmp_path / "student")
    outcome = run_experiment(config("ann", tiny_data, f"train.teacher={network}", "train.distill=0.7"), tracker)
    [run] = tracker.runs
    assert run.status == "FINISHED" and run.params["train.teacher"] == str(network)
    assert run.params["train.distill"] == 0.7 and outcome.metrics["test_accuracy"] > 0.3  # chance is 0.1

    cfg = config("ann", tiny_data, f"train.teacher={network}")
    data = with_teacher(fdata.load(tiny_data, 0.1, seed=0), cfg)
    assert data.teacher.run_id is None and "teacher_run_id" not in run.tags  # a bare file names no run
    served = Classifier.load(network).probabilities(fdata.load(tiny_data, 0.1, seed=0).x_train.numpy())
    assert torch.equal(data.teacher.probabilities, torch.from_numpy(served))  # the teacher as its model serves it
    assert with_teacher(data, cfg) is data  # a search's trials reuse it instead of running the teacher again
    assert with_teacher(data, config("ann", tiny_data)).teacher is None  # and a trial without one drops it

    other_inputs = tmp_path / "other.pt2"  # a saved program, but for 5 numbers, not 28x28 images
    torch.export.save(torch.export.export(torch.nn.Linear(5, 10), (torch.zeros(2, 5),)), other_inputs)
    with pytest.raises(ConfigError, match=f"train.teacher={other_inputs}: does not take 28x28 images"):
        run_experiment(config("ann", tiny_data, f"train.teacher={other_inputs}"), tracker)
    not_a_network = tmp_path / "notes.pt2"
    not_a_network.write_text("not a program")
    with pytest.raises(ConfigError, match=f"train.teacher={not_a_network}: not a saved fmnist network"):
        run_experiment(config("ann", tiny_data, f"train.teacher={not_a_network}"), tracker)
    assert len(tracker.runs) == 1  # refused before a run began


def test_muon_with_no_hidden_matrix_to_take_is_refused_before_a_run(tiny_data):
    tracker = NullTracker()  # this MLP has one hidden layer: two matrices, the first and the classifier
    with pytest.raises(ConfigError, match="train.optimizer=muon: this ann has no trained weight matrix between"):
        run_experiment(config("ann", tiny_data, "train.optimizer=muon"), tracker)
    assert tracker.runs == []
    run_experiment(config("ann", tiny_data, "train.optimizer=muon", "model.widths=[32,32]"), tracker)
    assert [run.status for run in tracker.runs] == ["FINISHED"]
