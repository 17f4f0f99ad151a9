"""ANN: a fully connected network on the flattened 28x28 image."""
from __future__ import annotations

from torch import nn

from fmnist.errors import ConfigError
from fmnist.models import register
from fmnist.models.layers import CLASSES, Dropout, Normalize


@register("ann")
def ann(widths: tuple[int, ...] = (1024, 512), dropout: float = 0.2) -> nn.Module:
    """`widths`: units of each hidden layer (Linear-BN-ReLU-dropout); `dropout`: share of units dropped."""
    if not all(1 <= w <= 16384 for w in widths):
        raise ConfigError(f"model.widths={list(widths)}: expected hidden layer widths from 1 to 16384")
    if not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout={dropout}: expected a value in [0, 1)")
    layers: list[nn.Module] = [Normalize(), nn.Flatten()]
    fan_in = 28 * 28
    for width in widths:
        layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), Dropout(dropout)]
        fan_in = width
    layers.append(nn.Linear(fan_in, CLASSES))
    return nn.Sequential(*layers)
