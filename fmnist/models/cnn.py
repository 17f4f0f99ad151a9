"""CNN: blocks of (conv-BN-ReLU) x convs_per_block, 2x2 max pooling and dropout; a linear head on the flat map."""
from __future__ import annotations

from torch import nn

from fmnist.errors import ConfigError
from fmnist.models import register
from fmnist.models.layers import CLASSES, Dropout, MirrorAveraged, Normalize


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


@register("cnn", follows={"average_mirror": "train.augment"})  # a net never trained on mirrors is not asked
def cnn(widths: tuple[int, ...] = (32, 96, 192), convs_per_block: int = 2, dropout: float = 0.06,
        head_dropout: float = 0.06, stem: int = 0, pool_early: bool = False,
        average_mirror: bool = True) -> nn.Module:
    """`widths`: channels of each block (each halves the image); `dropout` after each block, `head_dropout`
    before the classifier (light: with label smoothing 0.19 they scored best in benchmarks/accuracy.csv).
    `stem`: channels of one extra convolution at full resolution (0: none); `pool_early`: pool after each block's
    first convolution (airbench's layout: the rest of the block on a quarter of the pixels) instead of at its end.
    Neither paid here at equal time (benchmarks/accuracy.csv), so both are off. `average_mirror`: in eval mode
    (validation, test, the saved model) answer with the mean logits of the image and its mirror image; it needs
    the training's mirrored images, so in a configuration it follows train.augment unless it is set."""
    if not 1 <= len(widths) <= 4 or not all(1 <= w <= 1024 for w in widths):
        raise ConfigError(f"model.widths={list(widths)}: expected 1 to 4 blocks (each halves the 28 px image) of "
                          "1 to 1024 channels")
    if not 1 <= convs_per_block <= 4:
        raise ConfigError(f"model.convs_per_block={convs_per_block}: expected 1 to 4")
    if not 0 <= stem <= 1024:
        raise ConfigError(f"model.stem={stem}: expected 0 (no stem) to 1024 channels")
    if not (0 <= dropout < 1 and 0 <= head_dropout < 1):
        raise ConfigError(f"model.dropout={dropout}, model.head_dropout={head_dropout}: expected values in [0, 1)")
    layers: list[nn.Module] = [Normalize()] + (conv_bn(1, stem) if stem else [])
    c_in = stem or 1
    for width in widths:
        block = [m for i in range(convs_per_block) for m in conv_bn(c_in if i == 0 else width, width)]
        block.insert(1 if pool_early else len(block), nn.MaxPool2d(2))  # early: between first conv and its BN
        layers += block + [Dropout(dropout)]
        c_in = width
    # Flatten rather than global pooling: where a feature sits (collar, sole, strap) tells garments apart.
    side = 28 >> len(widths)
    layers += [nn.Flatten(), Dropout(head_dropout), nn.Linear(c_in * side * side, CLASSES)]
    return (MirrorAveraged if average_mirror else nn.Sequential)(*layers)
