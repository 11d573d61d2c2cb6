"""MobileNetV3-Large with FPN on its last two stages, torchvision's layout (body / fpn)."""

from __future__ import annotations

from torchvision.models import mobilenet_v3_large
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from frcnn.modeling.backbones.common import load_pretrained, norm_layer


def mobilenet_v3_large_fpn(
    pretrained: str = "", norm: str = "frozen_bn", trainable_layers: int = 3
) -> BackboneWithFPN:
    """The stages are the blocks where the resolution drops, as torchvision counts them;
    ``trainable_layers`` stages from the top are trained (0..6)."""
    model = mobilenet_v3_large(weights=None, norm_layer=norm_layer(norm))
    if pretrained:
        load_pretrained(model, pretrained, "mobilenet_v3_large")
    features = model.features
    stage_indices = (
        [0]
        + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
        + [len(features) - 1]
    )
    num_stages = len(stage_indices)
    if not 0 <= trainable_layers <= num_stages:
        raise ValueError(
            f"model.backbone.trainable_layers must be 0..{num_stages}, got {trainable_layers}"
        )
    freeze_before = (
        len(features) if trainable_layers == 0 else stage_indices[num_stages - trainable_layers]
    )
    for block in features[:freeze_before]:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
    returned = [num_stages - 2, num_stages - 1]
    return_layers = {str(stage_indices[k]): str(v) for v, k in enumerate(returned)}
    in_channels = [features[stage_indices[k]].out_channels for k in returned]
    return BackboneWithFPN(
        features, return_layers, in_channels, 256, extra_blocks=LastLevelMaxPool()
    )
