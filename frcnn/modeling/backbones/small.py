"""A small backbone trained from scratch: seven 3x3 conv layers, stride 8, trainable norm.

Meant for the CPU quick start: it learns the generated shapes in minutes on two cores.
"""

from __future__ import annotations

from torch import nn

from frcnn.modeling.backbones.common import SingleFeatureBackbone, norm_layer


def _conv(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        norm_layer(norm)(out_channels),
        nn.ReLU(inplace=True),
    )


def small_backbone(channels: int = 128, norm: str = "bn") -> SingleFeatureBackbone:
    """Widths grow to ``channels`` over three stride-2 stages: (N, 3, H, W) -> (N, C, H/8, W/8).

    It trains from scratch, so its norm layers must learn: ``norm`` is bn or gn."""
    if norm == "frozen_bn":
        raise ValueError(
            "model.backbone.norm=frozen_bn freezes statistics that a from-scratch backbone "
            "never learned; use bn or gn for the small backbone"
        )
    half, quarter = channels // 2, channels // 4
    body = nn.Sequential(
        _conv(3, quarter, 2, norm),
        _conv(quarter, quarter, 1, norm),
        _conv(quarter, half, 2, norm),
        _conv(half, half, 1, norm),
        _conv(half, channels, 2, norm),
        _conv(channels, channels, 1, norm),
        _conv(channels, channels, 1, norm),
    )
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return SingleFeatureBackbone(body, "stride8", channels)
