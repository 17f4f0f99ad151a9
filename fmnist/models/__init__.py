"""One registry from architecture name to builder, filled by `@register("name")` (timm's pattern).

Builders take keyword arguments with defaults, so an experiment file or an Optuna trial passes `**params`
straight through, and the builder's signature is the schema the config is checked against.
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from fmnist.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_FOLLOWS: dict[str, dict[str, str]] = {}


def register(name: str, follows: dict[str, str] | None = None):
    """`follows`: builder parameters whose default in a configuration is the value of a training option (the CNN's
    `average_mirror` follows `train.augment`); a value given for the parameter itself wins."""
    def wrap(builder):
        _REGISTRY[name] = builder
        _FOLLOWS[name] = dict(follows or {})
        return builder
    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown architecture {name!r}; expected one of {', '.join(available())}")
    return _REGISTRY[name]


def builder_params(name: str) -> dict[str, type]:
    """Each keyword parameter of the architecture's builder and its annotated type."""
    sig = inspect.signature(_builder(name), eval_str=True)
    return {p.name: p.annotation for p in sig.parameters.values()}


def builder_defaults(name: str) -> dict[str, object]:
    """The architecture's hyperparameter defaults: its builder's keyword defaults, the one place they live."""
    sig = inspect.signature(_builder(name))
    return {p.name: p.default for p in sig.parameters.values() if p.default is not inspect.Parameter.empty}


def followed_options(name: str) -> dict[str, str]:
    """Builder parameter -> the `section.key` option its default follows (see register)."""
    _builder(name)
    return _FOLLOWS[name]


def build_model(name: str, **params) -> nn.Module:
    return _builder(name)(**params)


from fmnist.models import ann, cnn, transfer  # noqa: E402,F401  (importing registers the builders)
