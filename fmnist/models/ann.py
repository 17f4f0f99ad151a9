"""ANN: a fully connected network on the flattened 28x28 image."""
from __future__ import annotations

from torch import nn

from fmnist.config import ConfigError
from fmnist.models import register
from fmnist.models.layers import Dropout, Normalize


@register("ann")
def ann(widths: tuple[int, ...] = (512, 256), dropout: float = 0.2, num_classes: int = 10) -> nn.Module:
    if not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout={dropout}: expected a value in [0, 1)")
    layers: list[nn.Module] = [Normalize(), nn.Flatten()]
    fan_in = 28 * 28
    for width in widths:
        layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), Dropout(dropout)]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)
