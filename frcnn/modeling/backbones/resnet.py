"""ResNet trunks: C4 (res2..res4 as trunk, res5 as the box head; the paper, jwyang, detectron2's C4)
and FPN (res2..res5 into torchvision's FeaturePyramidNetwork, P2-P6)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from frcnn.modeling.backbones.common import (
    SingleFeatureBackbone,
    freeze_except,
    load_pretrained,
    norm_layer,
)
from frcnn.modeling.roi_heads.box_heads import SequentialHead

DEPTHS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _resnet(depth: int, pretrained: str, norm: str, trainable_layers: int) -> resnet.ResNet:
    if depth not in DEPTHS:
        raise ValueError(f"no ResNet-{depth}; choose one of {sorted(DEPTHS)}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"model.backbone.trainable_layers must be 0..5, got {trainable_layers}")
    if pretrained and norm == "gn":
        raise ValueError("ImageNet weights carry batch-norm statistics; use norm frozen_bn or bn")
    model = DEPTHS[depth](weights=None, norm_layer=norm_layer(norm))
    if pretrained:
        load_pretrained(model, pretrained, f"resnet{depth}")
    trainable = _STAGES[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
    freeze_except(model, trainable)
    return model


def resnet_c4(
    depth: int, pretrained: str = "", norm: str = "frozen_bn", trainable_layers: int = 3
) -> tuple[SingleFeatureBackbone, SequentialHead]:
    """Trunk to res4 (stride 16, 1024 channels for depth >= 50); res5 + average pool as head."""
    model = _resnet(depth, pretrained, norm, trainable_layers)
    trunk = nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3
    )
    res4_channels, res5_channels = _stage_out_channels(model)[2:]
    # res5 is the box head: it trains whatever the trunk's freezing says
    for parameter in model.layer4.parameters():
        parameter.requires_grad_(True)
    head = SequentialHead(model.layer4, res5_channels, flatten=False)
    return SingleFeatureBackbone(trunk, "res4", res4_channels), head


def resnet_fpn(
    depth: int, pretrained: str = "", norm: str = "frozen_bn", trainable_layers: int = 3
) -> BackboneWithFPN:
    """torchvision's layout (body / fpn) so its detection checkpoints load key for key."""
    model = _resnet(depth, pretrained, norm, trainable_layers)
    in_channels = _stage_out_channels(model)
    return_layers = {f"layer{i + 1}": str(i) for i in range(4)}
    return BackboneWithFPN(model, return_layers, in_channels, 256, extra_blocks=LastLevelMaxPool())


def _stage_out_channels(model: resnet.ResNet) -> list[int]:
    channels = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        last = layer[-1]
        conv = last.conv3 if hasattr(last, "conv3") else last.conv2
        channels.append(conv.out_channels)
    return channels
