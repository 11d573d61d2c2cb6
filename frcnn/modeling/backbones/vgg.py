"""VGG16 as in the paper and jwyang/faster-rcnn.pytorch: conv1_1..conv5_3 (stride 16, the last
max-pool removed) as the trunk, fc6/fc7 as the box head on 7x7 pooled RoIs."""

from __future__ import annotations

from torch import nn
from torchvision.models import vgg16

from frcnn.modeling.backbones.common import SingleFeatureBackbone, load_pretrained
from frcnn.modeling.roi_heads.box_heads import InputReleasingLinear, SequentialHead

# features[:10] are conv1_x and conv2_x (with their ReLUs and pools): frozen in the paper
_FIRST_TRAINABLE = {5: 0, 4: 5, 3: 10, 2: 17, 1: 24, 0: 30}


def vgg16_backbone(
    pretrained: str = "", trainable_layers: int = 3
) -> tuple[SingleFeatureBackbone, SequentialHead]:
    """``trainable_layers`` counts conv stages from the top (3 = conv3..conv5, jwyang's choice)."""
    if trainable_layers not in _FIRST_TRAINABLE:
        raise ValueError(
            f"vgg16: model.backbone.trainable_layers must be 0..5, got {trainable_layers}"
        )
    model = vgg16(weights=None)
    if pretrained:
        load_pretrained(model, pretrained, "vgg16")
    trunk = model.features[:-1]  # drop pool5: conv5_3 at stride 16
    for layer in list(trunk)[: _FIRST_TRAINABLE[trainable_layers]]:
        for parameter in layer.parameters():
            parameter.requires_grad_(False)
    layers = list(model.classifier)[:-1]  # fc6, relu, dropout, fc7, relu, dropout
    layers[0] = _input_releasing(layers[0])  # fc6's input: every RoI's 25088 pooled features
    fc_head = nn.Sequential(*layers)
    return SingleFeatureBackbone(trunk, "conv5", 512), SequentialHead(fc_head, 4096, flatten=True)


def _input_releasing(linear: nn.Linear) -> InputReleasingLinear:
    """The same parameters in an InputReleasingLinear (built on the meta device: no new init)."""
    lean = InputReleasingLinear(linear.in_features, linear.out_features, device="meta")
    lean.weight, lean.bias = linear.weight, linear.bias
    return lean
