"""Transfer learning: a pretrained backbone cut into a frozen part and a trained part, under a new classifier.

The model takes raw uint8 28x28 images like every other architecture: resizing to the backbone's resolution,
grey to 3 channels and ImageNet normalisation happen inside it. Which stages train is decided here, once:
  frozen    only the classifier trains; the backbone is a fixed feature extractor
  finetune  the last `unfrozen_blocks` stages train too
  full      every stage trains
Frozen stages never get gradients and their batch norm stays in eval mode, keeping ImageNet statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmnist.errors import ConfigError
from fmnist.models import register
from fmnist.models.backbones import load_backbone
from fmnist.models.layers import CLASSES

MODES = ("frozen", "finetune", "full")


class ToImageNet(nn.Module):
    """Raw uint8 (N, 28, 28) or (N, 1, 28, 28) -> normalised float (N, 3, resolution, resolution)."""

    def __init__(self, resolution: int, mean, std):
        super().__init__()
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = F.interpolate(x.float(), size=(self.resolution, self.resolution), mode="bilinear",
                          align_corners=False)
        return (x - self.mean) / self.std  # broadcasting the one grey channel to three


class TransferNet(nn.Module):
    def __init__(self, prep: nn.Module, stages: list[nn.Module], head: nn.Module, trainable_stages: int,
                 name: str, pretrained: bool):
        super().__init__()
        self.prep, self.stages, self.head = prep, nn.Sequential(*stages), head
        self.cut = len(stages) - trainable_stages  # stages[:cut] are frozen
        # Names the frozen part for the activation cache; random weights differ per build, so they get none.
        self.cache_tag = f"{name}-{prep.resolution}px-frozen{self.cut}of{len(stages)}" if pretrained else None
        for p in self.frozen_part().parameters():
            p.requires_grad_(False)

    def frozen_part(self) -> nn.Sequential:
        """Raw images -> the activations the first trained stage takes; never trained."""
        return nn.Sequential(self.prep, *self.stages[:self.cut])

    def trained_part(self) -> nn.Sequential:
        return nn.Sequential(*self.stages[self.cut:], self.head)

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen_part().eval()  # frozen batch norm keeps the statistics it was pretrained with
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.prep(x)))


@register("transfer")
def transfer(backbone: str = "efficientnet_lite0", pretrained: bool = True, resolution: int = 112,
             mode: str = "finetune", unfrozen_blocks: int = 2, hidden: int = 0, dropout: float = 0.4) -> nn.Module:
    """`unfrozen_blocks`: how many of the backbone's last stages train in finetune mode (ignored otherwise)."""
    if mode not in MODES:
        raise ConfigError(f"model.mode={mode!r}: expected one of {', '.join(MODES)}")
    if not 32 <= resolution <= 512:
        raise ConfigError(f"model.resolution={resolution}: expected 32 to 512 pixels")
    if not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout={dropout}: expected a value in [0, 1)")
    if not 0 <= hidden <= 16384:
        raise ConfigError(f"model.hidden={hidden}: expected 0 (no hidden layer) to 16384 units")
    net = load_backbone(backbone, pretrained)
    if mode == "finetune" and not 1 <= unfrozen_blocks < len(net.stages):
        raise ConfigError(f"model.unfrozen_blocks={unfrozen_blocks}: {backbone} has {len(net.stages)} stages; "
                         f"expected 1 to {len(net.stages) - 1} (mode=frozen trains none, mode=full all)")
    trainable = {"frozen": 0, "finetune": unfrozen_blocks, "full": len(net.stages)}[mode]
    if hidden:
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.features, hidden), nn.ReLU(inplace=True),
                             nn.Dropout(dropout), nn.Linear(hidden, CLASSES))
    else:
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.features, CLASSES))
    return TransferNet(ToImageNet(resolution, net.mean, net.std), net.stages, head, trainable, backbone, pretrained)
