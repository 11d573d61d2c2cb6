"""The composition root: Config -> model, data loaders, optimizer, trainer.

Model code takes plain numbers and modules; this is the only place that reads the config to make
them. Implementations are chosen with plain dicts, no registries.
"""

from __future__ import annotations

from torch import nn

from frcnn.config.schema import ModelConfig
from frcnn.modeling import backbones
from frcnn.modeling.anchors import AnchorGenerator
from frcnn.modeling.faster_rcnn import FasterRCNN
from frcnn.modeling.roi_heads import (
    BoxPredictor,
    MLP2Head,
    MultiLevelPooler,
    PostprocessSettings,
    ProposalTargetSettings,
    ROIHeads,
    SingleLevelPooler,
)
from frcnn.modeling.rpn import RPN, AnchorMatcher, ProposalSettings, RPNHead

FPN_BACKBONES = {
    "resnet18_fpn": lambda c: backbones.resnet_fpn(18, c.pretrained, c.norm, c.trainable_layers),
    "resnet34_fpn": lambda c: backbones.resnet_fpn(34, c.pretrained, c.norm, c.trainable_layers),
    "resnet50_fpn": lambda c: backbones.resnet_fpn(50, c.pretrained, c.norm, c.trainable_layers),
    "resnet101_fpn": lambda c: backbones.resnet_fpn(101, c.pretrained, c.norm, c.trainable_layers),
    "mobilenet_v3_large_fpn": lambda c: backbones.mobilenet_v3_large_fpn(
        c.pretrained, c.norm, c.trainable_layers
    ),
}
# single-level trunks that bring their own box head (VGG16 fc6/fc7, ResNet res5)
TRUNK_WITH_HEAD = {
    "vgg16": lambda c: backbones.vgg16_backbone(c.pretrained, c.trainable_layers),
    "resnet50_c4": lambda c: backbones.resnet_c4(50, c.pretrained, c.norm, c.trainable_layers),
    "resnet101_c4": lambda c: backbones.resnet_c4(101, c.pretrained, c.norm, c.trainable_layers),
}
SINGLE_LEVEL = {"small": lambda c: backbones.small_backbone(c.channels, c.norm)}
BACKBONE_NAMES = sorted([*FPN_BACKBONES, *TRUNK_WITH_HEAD, *SINGLE_LEVEL])


def build_model(cfg: ModelConfig) -> FasterRCNN:
    backbone, trunk_head = _build_backbone(cfg)
    anchors = AnchorGenerator(cfg.anchors.sizes, cfg.anchors.aspect_ratios)
    if len(set(anchors.num_anchors_per_location)) != 1:
        raise ValueError("model.anchors: every level needs the same number of anchors (one head)")
    head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location[0], cfg.rpn.objectness)
    rpn = _build_rpn(cfg, head, anchors)
    is_fpn = cfg.backbone.name in FPN_BACKBONES
    roi_heads = _build_roi_heads(cfg, backbone, trunk_head, is_fpn)
    return FasterRCNN(
        backbone,
        rpn,
        roi_heads,
        cfg.pixel_mean,
        cfg.pixel_std,
        cfg.size_divisibility,
        channels_last=cfg.channels_last,
    )


def _build_backbone(cfg: ModelConfig) -> tuple[nn.Module, nn.Module | None]:
    name = cfg.backbone.name
    if name in FPN_BACKBONES:
        return FPN_BACKBONES[name](cfg.backbone), None
    if name in TRUNK_WITH_HEAD:
        return TRUNK_WITH_HEAD[name](cfg.backbone)
    if name in SINGLE_LEVEL:
        return SINGLE_LEVEL[name](cfg.backbone), None
    raise ValueError(f"unknown model.backbone.name {name!r}; choose one of {BACKBONE_NAMES}")


def _build_rpn(cfg: ModelConfig, head: RPNHead, anchors: AnchorGenerator) -> RPN:
    rpn = cfg.rpn
    matcher = AnchorMatcher(
        rpn.fg_iou_thresh,
        rpn.bg_iou_thresh,
        cfg.anchors.allowed_border,
        rpn.clobber_positives,
        rpn.crowd_ioa_thresh,
    )

    def settings(pre: int, post: int) -> ProposalSettings:
        return ProposalSettings(pre, post, rpn.nms_thresh, rpn.min_size, rpn.score_thresh)

    return RPN(
        head,
        anchors,
        matcher,
        settings(rpn.pre_nms_topk_train, rpn.post_nms_topk_train),
        settings(rpn.pre_nms_topk_test, rpn.post_nms_topk_test),
        rpn.batch_size_per_image,
        rpn.positive_fraction,
        rpn.smooth_l1_beta,
        rpn.loss_weight,
    )


def _build_roi_heads(
    cfg: ModelConfig, backbone: nn.Module, trunk_head: nn.Module | None, is_fpn: bool
) -> ROIHeads:
    roi = cfg.roi_heads
    resolution = roi.pooler_resolution
    if is_fpn:
        if roi.pooler != "align":
            raise ValueError("model.roi_heads.pooler: FPN backbones pool with RoIAlign only")
        pooler: nn.Module = MultiLevelPooler(["0", "1", "2", "3"], resolution, roi.sampling_ratio)
    else:
        pooler = SingleLevelPooler(
            backbone.feature_name, resolution, roi.pooler, roi.sampling_ratio, roi.aligned
        )
    if trunk_head is not None and roi.box_head != "mlp2":
        box_head = trunk_head
    else:
        box_head = MLP2Head(backbone.out_channels * resolution**2, roi.representation_size)
    predictor = BoxPredictor(box_head.out_features, cfg.num_classes, roi.class_agnostic_bbox_reg)
    return ROIHeads(
        pooler,
        box_head,
        predictor,
        ProposalTargetSettings(
            roi.fg_iou_thresh,
            roi.bg_iou_thresh_hi,
            roi.bg_iou_thresh_lo,
            roi.batch_size_per_image,
            roi.positive_fraction,
        ),
        PostprocessSettings(roi.score_thresh, roi.nms_thresh, roi.detections_per_image),
        tuple(roi.bbox_reg_weights),
        roi.smooth_l1_beta,
        roi.loss_weight,
    )
