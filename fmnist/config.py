"""Typed configuration: one dataclass per concern, filled from experiments/<arch>.yaml, then `key=value` overrides.

Resolution order (later wins): dataclass defaults -> experiment file -> overrides from the command line or
MLproject parameters. Everything is validated once, here, before any data is read or any run is started.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the option and what was expected."""


@dataclass
class DataConfig:
    data_dir: str | None = None  # None: $FMNIST_DATA, then /usr/share/datasets/fashion-mnist, then the user cache
    val_fraction: float = 0.1  # share of the 60k training images held out (stratified) for validation


@dataclass
class ModelConfig:
    arch: str = "cnn"  # a name in the model registry (fmnist.models.available())
    params: dict = field(default_factory=dict)  # keyword arguments of that architecture's builder


@dataclass
class TrainConfig:
    epochs: int = 10  # maximum number of passes over the training split
    batch_size: int = 256  # images per optimizer step
    lr: float = 3e-3  # peak learning rate of the schedule
    weight_decay: float = 5e-4  # AdamW decoupled weight decay
    label_smoothing: float = 0.1  # cross-entropy target smoothing, in [0, 1)
    schedule: str = "onecycle"  # onecycle | cosine
    warmup: float = 0.2  # share of the steps spent warming up (onecycle's pct_start; linear warmup for cosine)
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0 = never stop early
    augment: bool = False  # random shift (+-2 px) and horizontal flip, on the batch tensor
    seed: int = 0  # seeds the split, initialisation, shuffling and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where the CPU has it, AMP on CUDA) | bf16 | fp32
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)
    eval_batch_size: int = 1024  # images per forward pass when evaluating


@dataclass
class TrackingConfig:
    experiment: str = "fmnist"  # MLflow experiment name
    run_name: str | None = None  # None: MLflow picks one
    log_model: bool = True  # log the trained model (mlflow.pytorch) with signature and input example
    register: bool = True  # register the model as fmnist-<arch>; alias `champion` moves only on a better val accuracy


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

    def flat(self) -> dict[str, object]:
        """Every resolved value as `section.key`, the form logged as run params and accepted as overrides
        (the search space, a mapping, is logged by the search itself)."""
        out = {}
        for section in dataclasses.fields(self):
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                if key == "space":
                    continue
                if key == "params":
                    out.update({f"model.{k}": v for k, v in value.items()})
                else:
                    out[f"{section.name}.{key}"] = value
        return out


SECTIONS = ("model", "data", "train", "tracking", "tune")


def load_config(arch: str, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the experiment file (experiments/<arch>.yaml unless `path`), then `section.key=value`s."""
    from fmnist.models import builder_params  # the registry knows each architecture's parameters

    cfg = Config(model=ModelConfig(arch=arch))
    path = Path(path) if path else EXPERIMENTS_DIR / f"{arch}.yaml"
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, tracking, tune)")
    pairs = [(f"{s}.{k}", v, str(path)) for s, sec in doc.items() for k, v in _section(sec, s, path).items()]
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=3")
        pairs.append((key.strip(), yaml.safe_load(text) if text.strip() else None, "the command line"))

    model_params = builder_params(arch)  # raises with the list of architectures if the name is unknown
    for key, value, origin in pairs:
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
    validate(cfg)
    validate_space(cfg, arch, model_params)
    return cfg


def validate(cfg: Config) -> None:
    t, d, u = cfg.train, cfg.data, cfg.tune
    checks = [
        (t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs),
        (t.batch_size >= 1, "train.batch_size", "an integer >= 1", t.batch_size),
        (t.eval_batch_size >= 1, "train.eval_batch_size", "an integer >= 1", t.eval_batch_size),
        (t.lr > 0, "train.lr", "a learning rate > 0", t.lr),
        (t.weight_decay >= 0, "train.weight_decay", "a value >= 0", t.weight_decay),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", "a value in [0, 1)", t.label_smoothing),
        (0 < t.warmup < 1, "train.warmup", "a share in (0, 1)", t.warmup),
        (t.patience >= 0, "train.patience", "an integer >= 0 (0 = off)", t.patience),
        (t.threads >= 0, "train.threads", "an integer >= 0 (0 = all cores)", t.threads),
        (t.schedule in ("onecycle", "cosine"), "train.schedule", "onecycle or cosine", t.schedule),
        (t.precision in ("auto", "bf16", "fp32"), "train.precision", "auto, bf16 or fp32", t.precision),
        (t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         "auto, cpu, cuda or cuda:N", t.device),
        (0 < d.val_fraction < 1, "data.val_fraction", "a share in (0, 1)", d.val_fraction),
        (d.data_dir is None or Path(d.data_dir).is_dir(), "data.data_dir", "an existing directory", d.data_dir),
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
    if origin_type is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if origin_type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin_type is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, origin_type) or (origin_type is int and isinstance(value, bool)):
        raise ConfigError(f"{origin}: {key}={value!r}: expected {getattr(origin_type, '__name__', origin_type)}")
    return value
