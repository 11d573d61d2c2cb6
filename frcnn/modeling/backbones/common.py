"""Pieces every backbone shares: norm-layer choice, local pretrained weights, freezing, and the
single-feature wrapper. Backbones return an OrderedDict of feature maps, finest first, and carry
``out_channels``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

NORMS = ("frozen_bn", "bn", "gn")


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """frozen_bn for pretrained trunks (statistics and affine fixed), bn or gn (32 groups) for
    training from scratch."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"model.backbone.norm must be one of {NORMS}, got {kind!r}")


def load_pretrained(module: nn.Module, path: str, what: str) -> None:
    """Load a torchvision ImageNet checkpoint (a state_dict saved with torch.save) from a local
    file into ``module``; nothing is ever downloaded."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights for {what} not found: {path} (model.backbone.pretrained must name "
            'a local torchvision checkpoint, e.g. resnet50-0676ba61.pth; set it to "" to train '
            "from scratch)"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    # FrozenBatchNorm2d has no num_batches_tracked counter
    if not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("fc.", "classifier."))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit {what}: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; is it a torchvision {what} checkpoint?"
        )


def freeze_except(module: nn.Module, trainable_prefixes: Sequence[str]) -> None:
    """Stop gradients for every parameter whose name starts with none of the prefixes."""
    for name, parameter in module.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable_prefixes):
            parameter.requires_grad_(False)


class SingleFeatureBackbone(nn.Module):
    """A trunk with one output map (VGG16 conv5_3, ResNet res4, the small backbone)."""

    def __init__(self, body: nn.Module, feature_name: str, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.feature_name = feature_name
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([(self.feature_name, self.body(x))])
