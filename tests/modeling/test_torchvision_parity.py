"""frcnn against torchvision's own detectors: same weights, same input, same proposals and
detections (issue: boxes within 1e-3 px, scores within 1e-4)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
)
from torchvision.models.detection.rpn import concat_box_prediction_layers

from frcnn.build import build_model
from frcnn.config import load_config, with_overrides
from frcnn.modeling.weight_import import convert_torchvision_state_dict, freeze_batch_norm

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "torchvision"
# small inputs keep the test fast; the size at which torchvision resizes is checked separately
HEIGHT, WIDTH = 320, 448


def _confident_torchvision(builder, seed: int) -> nn.Module:
    """A seeded random torchvision detector whose batch-norm statistics come from one image (so
    activations stay in range) and whose classifier is biased towards a few classes (so that
    detections pass the 0.05 score threshold)."""
    torch.manual_seed(seed)
    model = builder(
        weights=None, weights_backbone=None, num_classes=91, min_size=HEIGHT, max_size=WIDTH
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.backbone.train()
        probe = model.transform(list(torch.rand(2, 3, HEIGHT, WIDTH)))[0].tensors
        model.backbone(probe)
        model.backbone.eval()
        features = model.backbone(probe)
        # scale the random layers so that every logit is O(1): neither saturated (ties) nor flat
        scale = torch.stack([f.std() for f in features.values()]).mean()
        head = model.rpn.head
        _init(head.conv[0][0], 1.0 / (scale * (9 * head.conv[0][0].in_channels) ** 0.5), 0.1)
        _init(head.cls_logits, 0.5 / head.cls_logits.in_channels**0.5, 0.2)
        _init(head.bbox_pred, 0.3 / head.bbox_pred.in_channels**0.5, 0.1)
        fc6 = model.roi_heads.box_head.fc6
        _init(fc6, 1.0 / (scale * fc6.in_features**0.5), 0.1)
        _init(model.roi_heads.box_head.fc7, 1.0 / fc6.out_features**0.5, 0.1)
        predictor = model.roi_heads.box_predictor
        _init(predictor.cls_score, 3.0 / predictor.cls_score.in_features**0.5, 2.0)
        _init(predictor.bbox_pred, 0.3 / predictor.bbox_pred.in_features**0.5, 0.1)
    freeze_batch_norm(model)
    return model.eval()


def _init(layer: nn.Module, weight_std: float, bias_std: float) -> None:
    layer.weight.normal_(std=float(weight_std))
    layer.bias.normal_(std=bias_std)


def _images(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.rand(3, HEIGHT, WIDTH, generator=generator),
        torch.rand(3, HEIGHT - 64, WIDTH, generator=generator),
    ]


def _reference_proposals(rpn: nn.Module, images, features: dict) -> tuple[list, list]:
    """torchvision's RPN forward up to its proposals, keeping the scores it does not return."""
    feature_list = list(features.values())
    objectness, deltas = rpn.head(feature_list)
    anchors = rpn.anchor_generator(images, feature_list)
    num_anchors_per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
    return rpn.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)


def _canonical(rows: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order by decreasing score, equal scores by their rows: boxes whose scores tie exactly
    (e.g. from the constant zero padding of a smaller image) have no defined order, in torchvision
    or here."""
    order = list(range(rows.shape[0]))
    order.sort(key=lambda i: (-float(scores[i]), rows[i].tolist()))
    index = torch.tensor(order, dtype=torch.int64)
    return rows[index], scores[index]


CASES = [
    ("fasterrcnn_resnet50_fpn", fasterrcnn_resnet50_fpn),
    ("fasterrcnn_mobilenet_v3_large_fpn", fasterrcnn_mobilenet_v3_large_fpn),
]


@pytest.mark.parametrize("arch,builder", CASES, ids=[c[0] for c in CASES])
def test_same_proposals_and_detections(arch: str, builder) -> None:
    _same_proposals_and_detections(arch, builder, "torchvision")


@pytest.mark.parametrize("kernel", ["grid_sample", "sparse"])
def test_same_detections_with_another_roi_align_kernel(kernel: str) -> None:
    """The speed settings model.roi_heads.roi_align_kernel=grid_sample / sparse pool to float
    rounding what torchvision's kernel pools (sparse: into channels_last rows, which the box
    head takes as they are): the detections stay within the same tolerances."""
    arch, builder = CASES[1]  # the MobileNet FPN: the cheaper of the two
    _same_proposals_and_detections(arch, builder, kernel)


def _same_proposals_and_detections(arch: str, builder, roi_align_kernel: str) -> None:
    reference = _confident_torchvision(builder, seed=0)
    cfg = load_config(CONFIGS / f"{arch}.yaml")
    cfg = with_overrides(cfg, [f"model.roi_heads.roi_align_kernel={roi_align_kernel}"])
    model = build_model(cfg.model).eval()
    state = convert_torchvision_state_dict(reference.state_dict(), cfg.model.rpn.objectness)
    model.load_state_dict(state)
    images = _images(seed=1)
    # Keep every detection over the threshold: a cut at 100 could fall between equal scores. A
    # higher threshold on both sides keeps the count readable; the code path is the same.
    reference.roi_heads.detections_per_img = 2000
    reference.roi_heads.score_thresh = 0.3
    model.roi_heads.postprocess = dataclasses.replace(
        model.roi_heads.postprocess, detections_per_image=2000, score_thresh=0.3
    )
    assert model.roi_heads.pooler.kernel == roi_align_kernel

    with torch.no_grad():
        ref_images, _ = reference.transform(images)
        ref_features = reference.backbone(ref_images.tensors)
        ref_proposals, ref_objectness = _reference_proposals(
            reference.rpn, ref_images, ref_features
        )
        assert all(
            torch.equal(a, b)
            for a, b in zip(ref_proposals, reference.rpn(ref_images, ref_features)[0])
        )
        image_list = model.preprocess(images)
        features = model.backbone(image_list.tensor)
        proposals, _ = model.rpn(image_list, list(features.values()))
        ref_detections = reference(images)
        detections = model(images, original_sizes=[tuple(i.shape[-2:]) for i in images])

    assert torch.equal(ref_images.tensors, image_list.tensor)
    for i, ref_boxes in enumerate(ref_proposals):
        ours = proposals.boxes[i][proposals.valid[i]]
        ref_scores = ref_objectness[i]
        assert ours.shape == ref_boxes.shape
        assert ours.shape[0] > 100, "the reference should propose something"
        ours_sorted, _ = _canonical(ours, proposals.scores[i][proposals.valid[i]])
        ref_sorted, _ = _canonical(ref_boxes, ref_scores)
        torch.testing.assert_close(ours_sorted, ref_sorted, atol=1e-3, rtol=0)
    for ref, ours in zip(ref_detections, detections):
        assert len(ref["boxes"]) > 5, "the reference should detect something"
        assert len(ours) == len(ref["boxes"]) < 2000
        ref_rows = torch.cat([ref["boxes"], ref["labels"][:, None].float()], dim=1)
        our_rows = torch.cat([ours.boxes, ours.labels[:, None].float()], dim=1)
        ref_rows, ref_scores = _canonical(ref_rows, ref["scores"])
        our_rows, our_scores = _canonical(our_rows, ours.scores)
        torch.testing.assert_close(our_rows[:, :4], ref_rows[:, :4], atol=1e-3, rtol=0)
        torch.testing.assert_close(our_scores, ref_scores, atol=1e-4, rtol=0)
        assert torch.equal(our_rows[:, 4], ref_rows[:, 4])


@pytest.mark.parametrize("arch,builder", CASES, ids=[c[0] for c in CASES])
def test_config_matches_torchvision_settings(arch: str, builder) -> None:
    reference = builder(weights=None, weights_backbone=None, num_classes=91)
    cfg = load_config(CONFIGS / f"{arch}.yaml")
    assert cfg.data.test_min_size == reference.transform.min_size[0]
    assert cfg.data.test_max_size == reference.transform.max_size
    assert list(cfg.model.pixel_mean) == reference.transform.image_mean
    assert list(cfg.model.pixel_std) == reference.transform.image_std
    assert cfg.model.rpn.score_thresh == reference.rpn.score_thresh
    assert cfg.model.rpn.pre_nms_topk_test == reference.rpn._pre_nms_top_n["testing"]
    assert cfg.model.rpn.post_nms_topk_test == reference.rpn._post_nms_top_n["testing"]
    assert cfg.model.rpn.nms_thresh == reference.rpn.nms_thresh
    assert cfg.model.roi_heads.score_thresh == reference.roi_heads.score_thresh
    assert cfg.model.roi_heads.nms_thresh == reference.roi_heads.nms_thresh
    assert cfg.model.roi_heads.detections_per_image == reference.roi_heads.detections_per_img
    assert cfg.model.num_classes + 1 == reference.roi_heads.box_predictor.cls_score.out_features
    model = build_model(cfg.model)
    ours = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    converted = convert_torchvision_state_dict(reference.state_dict(), cfg.model.rpn.objectness)
    assert ours == set(converted)
