"""Layers shared by the architectures."""
from __future__ import annotations

import torch
from torch import nn

# Mean and standard deviation of the Fashion-MNIST training pixels, on the 0-1 scale.
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


class Normalize(nn.Module):
    """Raw uint8 images (N, 28, 28) or (N, 1, 28, 28) -> standardised float (N, 1, 28, 28).

    Living inside the model means a saved model takes the same raw images a user has.
    """

    def __init__(self, mean: float = FMNIST_MEAN, std: float = FMNIST_STD):
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0 / (255.0 * std)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean / std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return x.to(self.scale.dtype) * self.scale - self.shift
