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


class Dropout(nn.Dropout):
    """nn.Dropout that is 8x faster on a CPU: one random byte per element instead of one 32-bit number.

    torch's CPU dropout draws a 32-bit random number per element, which made it a third of the MLP's training
    step here. Eight mask bytes come from each 64-bit draw; p is rounded to a multiple of 1/256. The global torch
    generator supplies the draws, so seeding works as for nn.Dropout. Other devices use torch's own kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        draws = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64)
        keep = draws.view(torch.uint8)[:n].view(x.shape) >= round(self.p * 256)
        return x * keep * (1 / (1 - self.p))
