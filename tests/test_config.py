import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fmnist.config import EXPERIMENTS_DIR, TrainConfig, load_config
from fmnist.errors import ConfigError, reported
from fmnist.models import available, builder_defaults

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", ["ann", "cnn", "transfer"])
def test_experiment_files_load_and_override(arch, tmp_path):
    cfg = load_config(arch)
    assert cfg.model.arch == arch and cfg.flat()["model.dropout"] == cfg.model_defaults["dropout"]
    cfg = load_config(arch, overrides=["train.epochs=2", "train.lr=1e-4", "model.dropout=0.5",
                                       f"data.data_dir={tmp_path}", "tracking.run_name=x"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.params["dropout"]) == (2, 1e-4, 0.5)
    assert isinstance(cfg.train.lr, float) and cfg.data.data_dir == str(tmp_path)
    assert cfg.flat()["model.dropout"] == 0.5 and cfg.flat()["train.epochs"] == 2


def test_list_values_become_tuples():
    cfg = load_config("cnn", overrides=["model.widths=[8, 16]"])
    assert cfg.model.params["widths"] == (8, 16)


@pytest.mark.parametrize("override,message", [
    ("train.lr=-0.1", "train.lr=-0.1: expected a learning rate > 0"),
    ("train.epochs=0", "train.epochs=0: expected an integer >= 1"),
    ("train.epochs=2.5", "train.epochs=2.5: expected int"),
    ("train.epochs=many", "train.epochs='many': expected int"),
    ("data.data_dir=/does/not/exist", "data.data_dir='/does/not/exist': expected an existing directory"),
    ("train.schedule=step", "train.schedule='step': expected onecycle or cosine"),
    ("train.optimizer=adam", "train.optimizer='adam': expected adamw, sgd or muon"),
    ("train.epocs=3", "unknown option 'train.epocs'"),
    ("model.depth=3", "unknown option 'model.depth' for cnn; expected one of model.widths"),
    ("model.widths=3", "model.widths=3: expected a non-empty list"),
    ("model.arch=ann", "model.arch='ann', but the architecture asked for is 'cnn'"),
    ("epochs", "expected section.key=value"),
    ("train.lr=inf", "train.lr=inf: expected a finite number"),
    ("train.lr=.nan", "train.lr=nan: expected a finite number"),
    ("train.lr=11", "train.lr=11.0: expected a learning rate > 0 and <= 10"),
    ("train.seed=-1", "train.seed=-1: expected an integer >= 0"),
    ("model.widths=[0]", "model.widths=[0]: expected 1 to 4 blocks (each halves the 28 px image) of 1 to 1024"),
    ("model.widths=[-5]", "model.widths=[-5]: expected 1 to 4 blocks"),
    ("model.widths=[8,8,8,8,8]", "model.widths=[8, 8, 8, 8, 8]: expected 1 to 4 blocks"),
    ("model.convs_per_block=0", "model.convs_per_block=0: expected 1 to 4"),
    ("train.device=cudaX", "train.device='cudaX': expected auto, cpu, cuda or cuda:N"),
    ("tracking.heartbeat=0", "tracking.heartbeat=0.0: expected seconds >= 1"),
    ("train.distill=1.5", "train.distill=1.5: expected a share in [0, 1]"),
    ("train.teacher=/no/such/network.pt2", "train.teacher='/no/such/network.pt2': expected an MLflow model URI "
                                           "(models:/fmnist-cnn@champion, runs:/<run id>/model) or an existing"),
])
def test_invalid_values_are_refused_with_the_option_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("cnn", overrides=[override])
    assert message in str(e.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_run():
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"train.device='{device}': this machine has no CUDA devices; use "
                                              "train.device=auto or cpu"):
            load_config("cnn", overrides=[f"train.device={device}"])


def test_ann_widths_and_transfer_values_are_range_checked_by_their_builders():
    with pytest.raises(ConfigError, match=r"model.widths=\[0\]: expected hidden layer widths from 1 to 16384"):
        load_config("ann", overrides=["model.widths=[0]"])
    with pytest.raises(ConfigError, match="model.unfrozen_blocks=30: efficientnet_lite0 has 18 stages"):
        load_config("transfer", overrides=["model.unfrozen_blocks=30"])  # checked on the meta device: no weights


def test_a_teacher_is_for_ann_and_cnn_only():
    with pytest.raises(ConfigError, match="train.teacher='models:/fmnist-cnn@champion': expected none for transfer"):
        load_config("transfer", overrides=["train.teacher=models:/fmnist-cnn@champion"])
    assert load_config("ann", overrides=["train.teacher=models:/fmnist-cnn@champion"]).train.distill == 0.5


def test_an_empty_override_means_not_given():
    assert load_config("cnn", overrides=["train.epochs=", "data.data_dir="]).train.epochs == \
        load_config("cnn").train.epochs


def test_the_cnn_averages_the_mirror_only_where_it_trained_on_mirror_images():
    def mirror(*overrides):
        return load_config("cnn", overrides=list(overrides)).flat()["model.average_mirror"]

    assert mirror() is True
    assert mirror("train.augment=false") is False
    assert mirror("train.augment=false", "model.average_mirror=true") is True  # said explicitly: kept
    assert mirror("model.average_mirror=false") is False


def test_a_value_every_architecture_must_choose_has_no_default(tmp_path):
    (tmp_path / "x.yaml").write_text("train: {epochs: 1, batch_size: 8}\n")
    with pytest.raises(ConfigError, match="train.lr: no value; expected it in .*x.yaml or as train.lr="):
        load_config("ann", tmp_path / "x.yaml")
    assert load_config("ann", tmp_path / "x.yaml", ["train.lr=0.01"]).train.lr == 0.01


def test_unknown_architecture_lists_the_valid_ones(tmp_path):
    (tmp_path / "x.yaml").write_text("train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match="unknown architecture 'resnet'; expected one of ann, cnn"):
        load_config("resnet", tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="experiment file .*nope.yaml does not exist"):
        load_config("cnn", tmp_path / "nope.yaml")


def test_bad_experiment_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config("cnn", bad)
    bad.write_text("optimizer: {lr: 1}\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown section 'optimizer'"):
        load_config("cnn", bad)
    bad.write_text("train: {epochs: 1, batch_size: 8, lr: -1}\n")
    with pytest.raises(ConfigError, match="train.lr=-1.0"):
        load_config("cnn", bad)


def test_every_budget_file_loads_and_an_unknown_budget_lists_them(capsys):
    for path in EXPERIMENTS_DIR.glob("*-*.yaml"):
        assert load_config(path.stem.split("-")[0], path).train.epochs >= 1
    from fmnist.cli import main

    assert main(["train", "--arch", "transfer", "--budget", "huge", "--dry-run"]) == 2
    assert "--budget huge: no transfer-huge.yaml; expected one of long" in capsys.readouterr().err


def test_overrides_may_follow_an_option(capsys):
    from fmnist.cli import main

    # Checked, not refused: the override after --dry-run reaches the configuration (and fails its range check).
    assert main(["train", "--arch", "cnn", "train.seed=1", "--dry-run", "train.lr=-1"]) == 2
    assert "train.lr=-1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # an unknown option is still argparse's error
        main(["train", "--arch", "cnn", "train.seed=1", "--dry-run", "--nope", "train.lr=1"])
    assert e.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_every_architecture_has_an_experiment_file():
    assert {p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")} >= set(available())


@pytest.mark.parametrize("arch", ["ann", "cnn", "transfer"])
def test_experiment_files_repeat_no_default(arch):
    """Each value has one home: an experiment file holds only what differs from the builder's and the dataclasses'
    defaults, or what has no default at all."""
    doc = yaml.safe_load((EXPERIMENTS_DIR / f"{arch}.yaml").read_text())
    model_defaults, train_defaults = builder_defaults(arch), TrainConfig()
    for key, value in doc.get("model", {}).items():
        assert model_defaults.get(key) != (tuple(value) if isinstance(value, list) else value), f"model.{key}"
    for key, value in doc.get("train", {}).items():
        assert getattr(train_defaults, key) != value, f"train.{key} repeats its default"


@pytest.mark.parametrize("arch", ["ann", "cnn", "transfer", "main"])
def test_mlproject_passes_only_what_the_user_gave(arch):
    """MLproject parameters default to "" (not given), so no value is kept in step in two places."""
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][arch]
    for name, spec in entry["parameters"].items():
        if name not in ("archs",):
            assert spec["default"] == "", (arch, name)
        assert f"{{{name}}}" in entry["command"], (arch, name)


@pytest.mark.parametrize("space,message", [
    ("{train.nope: {low: 1, high: 2}}", "tune.space.train.nope: 'train.nope' is not a searchable option of cnn"),
    ("{train.lr: {low: 0.01, high: 0.001}}", "expected {low: a, high: b} with numbers a < b"),
    ("{train.lr: {low: 0, high: 0.1, log: true}}", "log: true needs low > 0"),
    ("{model.widths: {choices: []}}", "with a non-empty list"),
    ("{train.lr: 0.01}", "expected {low: .., high: ..} or {choices: [..]}"),
])
def test_search_space_is_checked_against_the_architecture(space, message):
    with pytest.raises(ConfigError) as e:
        load_config("cnn", overrides=[f"tune.space={space}"])
    assert message in str(e.value)


def test_every_shipped_search_space_is_valid_and_its_defaults_lie_inside():
    for arch in ("ann", "cnn", "transfer"):
        cfg = load_config(arch)
        assert cfg.tune.space, arch
        from fmnist.space import inside

        flat = cfg.flat()
        assert all(inside(flat[key], spec) for key, spec in cfg.tune.space.items()), arch


def test_tune_refuses_bad_options_before_any_study(tiny_data, tmp_path, capsys):
    from fmnist.cli import main

    base = ["tune", "--arch", "ann", "--data-dir", str(tiny_data)]
    assert main(base) == 2
    assert "--n-trials (tune.n_trials) is 0" in capsys.readouterr().err
    assert main([*base, "--n-trials", "2", "--storage", "nosuchdb://x"]) == 2
    assert "tune.storage=nosuchdb://x: not a database URL" in capsys.readouterr().err
    assert main([*base, "--n-trials", "2", "tune.pruner=best"]) == 2
    assert "tune.pruner='best': expected median, hyperband or none" in capsys.readouterr().err
    not_a_network = tmp_path / "teacher.pt2"
    not_a_network.write_text("not a program")
    assert main([*base, "--n-trials", "2", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                 f"train.teacher={not_a_network}"]) == 2
    assert f"train.teacher={not_a_network}: not a saved fmnist network" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists()  # refused before any study


def test_a_script_reports_a_user_error_in_one_line_with_status_2_and_lets_others_through(capsys):
    with pytest.raises(SystemExit) as stopped:
        with reported("script.py"):
            raise ConfigError("train.lr=inf:\n   expected a finite number")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "script.py: error: train.lr=inf: expected a finite number\n"
    with pytest.raises(RuntimeError):  # a bug is not the user's to fix: its traceback stays
        with reported("script.py"):
            raise RuntimeError("a bug")


def test_a_script_interrupted_with_ctrl_c_says_so_in_one_line_with_status_130():
    script = ("import time\nfrom fmnist.errors import reported\nwith reported('script.py'):\n"
              "    print('ready', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (130, "script.py: interrupted\n")
