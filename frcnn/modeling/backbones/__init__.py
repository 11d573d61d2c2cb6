from frcnn.modeling.backbones.common import NORMS, SingleFeatureBackbone, norm_layer
from frcnn.modeling.backbones.mobilenet import mobilenet_v3_large_fpn
from frcnn.modeling.backbones.resnet import resnet_c4, resnet_fpn
from frcnn.modeling.backbones.small import small_backbone
from frcnn.modeling.backbones.vgg import vgg16_backbone

__all__ = [
    "NORMS",
    "SingleFeatureBackbone",
    "mobilenet_v3_large_fpn",
    "norm_layer",
    "resnet_c4",
    "resnet_fpn",
    "small_backbone",
    "vgg16_backbone",
]
