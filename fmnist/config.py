"""Typed configuration: one dataclass per concern, filled from experiments/<arch>.yaml, then `key=value` overrides.

Where each default lives, once:
- a model's hyperparameters: its builder's keyword defaults (fmnist/models/<arch>.py);
- training, data, tracking and search settings shared by every architecture: the dataclasses below;
- what each architecture must choose for itself (epochs, lr, batch size): its experiment file, which holds only
  what differs from the two above (tests/test_config.py checks that it repeats no default). REQUIRED marks these.
Resolution order (later wins): defaults -> experiment file -> overrides from the command line or MLproject
parameters, where an empty value (`train.epochs=`) means "not given". Everything is validated here, the model's
options by building it on the meta device, before any data is read or any run is started.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fmnist.errors import ConfigError, one_line

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
REQUIRED: typing.Any = None  # no default: the experiment file (or an override) must give the value


@dataclass
class DataConfig:
    data_dir: str | None = None  # None: $FMNIST_DATA, then /usr/share/datasets/fashion-mnist, then the user cache
    val_fraction: float = 0.1  # share of the 60k training images held out (stratified) for validation


@dataclass
class ModelConfig:
    arch: str = "cnn"  # a name in the model registry (fmnist.models.available())
    params: dict = field(default_factory=dict)  # keyword arguments of that architecture's builder, as given


@dataclass
class TrainConfig:
    epochs: int = REQUIRED  # passes over the training split
    batch_size: int = REQUIRED  # images per optimizer step
    lr: float = REQUIRED  # peak learning rate of the schedule
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum 0.9) | muon (hidden weights; NAdamW on the rest)
    weight_decay: float = 0.05  # AdamW's decoupled weight decay; SGD's L2 penalty (there ~5e-4 is usual)
    label_smoothing: float = 0.1  # cross-entropy target smoothing, in [0, 1)
    schedule: str = "onecycle"  # onecycle | cosine
    warmup: float = 0.2  # share of the steps spent warming up (onecycle's pct_start; linear warmup for cosine)
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0 = never stop early
    augment: bool = False  # random shift (+-2 px) and horizontal flip, on the batch tensor
    erase: float = 0.0  # probability per image of random erasing (one rectangle of 2-20 % of the image set to 0)
    seed: int = 0  # seeds the split, initialisation, shuffling and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where the CPU has it, AMP on CUDA) | bf16 | fp32
    # torch intra-op threads; 0 = torch's default (all cores). A seed repeats a run's metrics exactly only with the
    # same thread count: it changes the order of bf16 sums (cnn-long, seed 0: 0.9455 on 1 thread, 0.9444 on 2).
    threads: int = 0
    eval_batch_size: int = 1024  # images per forward pass when evaluating
    # Distillation (ann, cnn): a trained network whose class probabilities on the training images join the labels
    # as the target: an MLflow model URI (models:/fmnist-cnn@champion, runs:/<run id>/model) or a logged model's
    # folder or its network.pt2 file. "": the labels alone.
    teacher: str = ""
    distill: float = 0.5  # with a teacher: its probabilities' share of the target, the label's being the rest


@dataclass
class TrackingConfig:
    experiment: str = "fmnist"  # MLflow experiment name
    run_name: str | None = None  # None: MLflow picks one
    log_model: bool = True  # log the trained model as an MLflow pyfunc (raw images in, classes out)
    register: bool = True  # register the model as fmnist-<arch>; alias `champion` moves only on a better val accuracy
    heartbeat: float = 30  # seconds between a running run's heartbeats; a run silent for 3x is ended FAILED
    outage_wait: float = 60  # seconds a finished run waits for an unreachable server before keeping its record locally


@dataclass
class TuneConfig:
    n_trials: int = 0  # trials the study should hold in all (0: no search); a re-run or another worker tops it up
    timeout: float = 0  # seconds this worker searches before it stops; 0 = no limit
    storage: str = "sqlite:///optuna.db"  # an SQLAlchemy URL (sqlite, postgresql://...) or a journal file *.log
    study_name: str | None = None  # None: <experiment>-<arch>
    n_jobs: int = 1  # trials run in parallel threads of this process
    pruner: str = "median"  # median | hyperband | none, fed the per-epoch validation accuracy
    seed: int = 0  # seeds the TPE sampler
    retrain: bool = True  # then retrain the best configuration, test it once and register it
    heartbeat: int = 60  # seconds between a running trial's heartbeats; a trial silent for 2x is failed and retried
    space: dict = field(default_factory=dict)  # option -> {low, high[, log][, step]} or {choices: [...]}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    model_defaults: dict = field(default_factory=dict, repr=False)  # the builder's defaults, for flat()

    def flat(self) -> dict[str, object]:
        """Every resolved value as `section.key` (the model's builder defaults included), the form logged as run
        params and accepted as overrides (the search space, a mapping, is logged by the search itself)."""
        out = {"model.arch": self.model.arch}
        out.update({f"model.{k}": v for k, v in (self.model_defaults | self.model.params).items()})
        for section in SECTIONS[1:]:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                if key != "space":
                    out[f"{section}.{key}"] = value
        return out


SECTIONS = ("model", "data", "train", "tracking", "tune")


def load_config(arch: str, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the experiment file (experiments/<arch>.yaml unless `path`), then `section.key=value`s."""
    from fmnist.models import builder_defaults, builder_params, followed_options  # raise with the list of archs

    model_params = builder_params(arch)
    cfg = Config(model=ModelConfig(arch=arch), model_defaults=builder_defaults(arch))
    path = Path(path) if path else EXPERIMENTS_DIR / f"{arch}.yaml"
    for key, value, origin in read_experiment(path) + parse_overrides(overrides):
        section, _, name = key.partition(".")
        if key == "model.arch":
            if value != arch:
                raise ConfigError(f"{origin}: model.arch={value!r}, but the architecture asked for is {arch!r}")
            continue
        if section == "model":
            if name not in model_params:
                raise ConfigError(f"{origin}: unknown option {key!r} for {arch}; expected one of "
                                  + ", ".join(f"model.{p}" for p in model_params))
            cfg.model.params[name] = _coerce(value, model_params[name], key, origin)
            continue
        target = getattr(cfg, section) if section in SECTIONS[1:] else None
        types_ = {f.name: f.type for f in dataclasses.fields(target)} if target is not None else {}
        if name not in types_:
            valid = sorted(k for k in cfg.flat() if not k.startswith("model.")) + ["model.<builder parameter>"]
            raise ConfigError(f"{origin}: unknown option {key!r}; expected one of {', '.join(valid)}")
        setattr(target, name, _coerce(value, _resolve(types_[name]), key, origin))
    for param, option in followed_options(arch).items():  # builder defaults that follow a training option
        if param not in cfg.model.params:
            section, _, name = option.partition(".")
            cfg.model.params[param] = getattr(getattr(cfg, section), name)
    validate(cfg, path)
    validate_space(cfg, arch, model_params)
    check_model(cfg)
    return cfg


def read_experiment(path: Path) -> list[tuple[str, object, str]]:
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {one_line(e)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, tracking, tune)")
    return [(f"{s}.{k}", v, str(path)) for s, sec in doc.items() for k, v in _section(sec, s, path).items()]


def parse_overrides(overrides: list[str]) -> list[tuple[str, object, str]]:
    """`section.key=value`, the value read as YAML; `section.key=` (an unset MLproject parameter) is skipped."""
    pairs = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=3")
        if text.strip():
            try:
                pairs.append((key.strip(), yaml.safe_load(text), "the command line"))
            except yaml.YAMLError:
                raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    return pairs


def validate(cfg: Config, path: Path) -> None:
    t, d, u, k = cfg.train, cfg.data, cfg.tune, cfg.tracking
    for f in dataclasses.fields(t):
        if getattr(t, f.name) is REQUIRED:
            raise ConfigError(f"train.{f.name}: no value; expected it in {path} or as train.{f.name}=...")
    checks = [
        (t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs),
        (t.batch_size >= 1, "train.batch_size", "an integer >= 1", t.batch_size),
        (t.eval_batch_size >= 1, "train.eval_batch_size", "an integer >= 1", t.eval_batch_size),
        (0 < t.lr <= 10, "train.lr", "a learning rate > 0 and <= 10", t.lr),
        (0 <= t.weight_decay <= 10, "train.weight_decay", "a value in [0, 10]", t.weight_decay),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", "a value in [0, 1)", t.label_smoothing),
        (0 <= t.erase <= 1, "train.erase", "a probability in [0, 1]", t.erase),
        (0 < t.warmup < 1, "train.warmup", "a share in (0, 1)", t.warmup),
        (t.patience >= 0, "train.patience", "an integer >= 0 (0 = off)", t.patience),
        (t.seed >= 0, "train.seed", "an integer >= 0", t.seed),
        (t.threads >= 0, "train.threads", "an integer >= 0 (0 = all cores)", t.threads),
        (t.schedule in ("onecycle", "cosine"), "train.schedule", "onecycle or cosine", t.schedule),
        (t.optimizer in ("adamw", "sgd", "muon"), "train.optimizer", "adamw, sgd or muon", t.optimizer),
        (t.precision in ("auto", "bf16", "fp32"), "train.precision", "auto, bf16 or fp32", t.precision),
        (0 <= t.distill <= 1, "train.distill", "a share in [0, 1]", t.distill),
        (not t.teacher or is_uri(t.teacher) or Path(t.teacher).exists(), "train.teacher",
         "an MLflow model URI (models:/fmnist-cnn@champion, runs:/<run id>/model) or an existing model folder or "
         "network.pt2 file", t.teacher),
        (not t.teacher or cfg.model.arch != "transfer", "train.teacher", "none for transfer, which trains on "
         "cached activations (distillation is for ann and cnn)", t.teacher),
        (0 < d.val_fraction < 1, "data.val_fraction", "a share in (0, 1)", d.val_fraction),
        (d.data_dir is None or Path(d.data_dir).is_dir(), "data.data_dir", "an existing directory", d.data_dir),
        (k.heartbeat >= 1, "tracking.heartbeat", "seconds >= 1", k.heartbeat),
        (k.outage_wait >= 0, "tracking.outage_wait", "seconds >= 0", k.outage_wait),
        (u.n_trials >= 0, "tune.n_trials", "an integer >= 0 (0 = no search)", u.n_trials),
        (u.timeout >= 0, "tune.timeout", "seconds >= 0 (0 = no limit)", u.timeout),
        (u.n_jobs >= 1, "tune.n_jobs", "an integer >= 1", u.n_jobs),
        (u.heartbeat >= 1, "tune.heartbeat", "seconds >= 1", u.heartbeat),
        (u.pruner in ("median", "hyperband", "none"), "tune.pruner", "median, hyperband or none", u.pruner),
        (bool(u.storage), "tune.storage", "an SQLAlchemy URL or a journal file *.log", u.storage),
    ]
    for ok, key, expected, value in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r}: expected {expected}")
    check_device(t.device)


def is_uri(text: str) -> bool:
    """An MLflow model URI (models:/..., runs:/..., s3://...) rather than a local path."""
    return re.match(r"[a-z][a-z0-9+.-]+:/", text) is not None


def check_device(name: str) -> None:
    """`auto`, `cpu`, or a CUDA device that exists on this machine."""
    import torch

    if name in ("auto", "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise ConfigError(f"train.device={name!r}: expected auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1) or 0)
    if index >= count:
        raise ConfigError(f"train.device={name!r}: this machine has {count or 'no'} CUDA device"
                          f"{'s' * (count != 1)}; use train.device=auto or cpu")


def check_model(cfg: Config) -> None:
    """Build the model on the meta device (no memory, no weights copied): every check its builder makes, and
    whether the optimizer has what it takes in it, runs now, before any run exists, instead of after data loading."""
    import torch

    from fmnist.models import build_model
    from fmnist.train import muon_matrices

    with torch.device("meta"):
        model = build_model(cfg.model.arch, **cfg.model.params)
    if cfg.train.optimizer == "muon" and not muon_matrices(model):
        raise ConfigError(f"train.optimizer=muon: this {cfg.model.arch} has no trained weight matrix between its "
                          "first and last layers for Muon to take; expected adamw or sgd, or more layers")


def validate_space(cfg: Config, arch: str, model_params: dict) -> None:
    """Each searched option must exist and have a range ({low, high[, log][, step]}) or {choices: [...]}."""
    options = set(cfg.flat()) | {f"model.{p}" for p in model_params}
    for key, spec in cfg.tune.space.items():
        where = f"tune.space.{key}"
        if key not in options or key.startswith("tune.") or key == "model.arch":
            raise ConfigError(f"{where}: {key!r} is not a searchable option of {arch}; expected one of "
                              + ", ".join(sorted(o for o in options if not o.startswith(("tune.", "model.arch")))))
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
        if "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{where}: expected {{choices: [a, b, ...]}} with a non-empty list")
            continue
        low, high = spec.get("low"), spec.get("high")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if set(spec) - {"low", "high", "log", "step"} or not numbers or not low < high:
            raise ConfigError(f"{where}: expected {{low: a, high: b}} with numbers a < b (and optional log: true "
                              f"or step), got {spec!r}")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"{where}: log: true needs low > 0, got low={low}")


def _section(value, name: str, path: Path) -> dict:
    if name not in SECTIONS:
        raise ConfigError(f"{path}: unknown section {name!r}; expected one of {', '.join(SECTIONS)}")
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: section {name!r} must be a mapping of key: value")
    return value


def _resolve(annotation):
    """Dataclass annotations are strings under `from __future__ import annotations`."""
    return eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation


def _coerce(value, kind, key: str, origin: str):
    """Check `value` against a simple type (int, float, str, bool, tuple/list of those, X | None)."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    origin_type = typing.get_origin(kind) or kind
    if origin_type in (tuple, list):
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{origin}: {key}={value!r}: expected a non-empty list, e.g. [256, 128]")
        item = args[0] if args else int
        return tuple(_coerce(v, item, key, origin) for v in value)
    if origin_type is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{origin}: {key}={value!r}: expected a finite number")
            return float(value)
    if origin_type is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, origin_type) or (origin_type is int and isinstance(value, bool)):
        raise ConfigError(f"{origin}: {key}={value!r}: expected {getattr(origin_type, '__name__', origin_type)}")
    return value
