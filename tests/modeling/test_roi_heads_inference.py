"""At inference the box head skips the proposal slots no image fills; the detections are those of
the full slots, and an image set without any proposal gives empty detections."""

from __future__ import annotations

from collections import OrderedDict

import torch

from frcnn.build import build_model
from frcnn.config import AnchorConfig, BackboneConfig, ModelConfig, ROIHeadsConfig
from frcnn.modeling.roi_heads import postprocess_detections
from frcnn.modeling.rpn.proposals import Proposals
from frcnn.structures import ImageList


def _model() -> torch.nn.Module:
    config = ModelConfig(
        num_classes=3,
        backbone=BackboneConfig(name="small", norm="bn", channels=32),
        anchors=AnchorConfig(sizes=[[16.0, 32.0]]),
        roi_heads=ROIHeadsConfig(representation_size=32, score_thresh=0.0),
    )
    torch.manual_seed(0)
    return build_model(config).eval()


def _inputs(valid_counts: list[int]) -> tuple[OrderedDict, Proposals, ImageList]:
    num_images, slots = len(valid_counts), 12
    generator = torch.Generator().manual_seed(1)
    corner = torch.rand(num_images, slots, 2, generator=generator) * 40
    boxes = torch.cat([corner, corner + 6 + torch.rand(num_images, slots, 2) * 20], dim=-1)
    valid = torch.arange(slots)[None, :] < torch.tensor(valid_counts)[:, None]
    boxes = boxes * valid[..., None]  # empty slots hold zeros, as the proposal layer leaves them
    scores = torch.rand(num_images, slots, generator=generator) * valid
    features = OrderedDict(stride8=torch.randn(num_images, 32, 8, 8, generator=generator))
    images = ImageList(torch.zeros(num_images, 3, 64, 64), [(64, 64)] * num_images)
    return features, Proposals(boxes, scores, valid), images


def test_detections_equal_those_of_the_full_slots() -> None:
    model = _model()
    features, proposals, images = _inputs([5, 2, 7])
    heads = model.roi_heads
    with torch.no_grad():
        detections = heads(features, proposals, images)
        # every slot, pooled in RoI order in one tensor and run through the head at once
        pooled = heads.pooler(features, proposals.boxes, images.image_sizes, (64, 64))
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        expected = postprocess_detections(
            logits.reshape(3, 12, -1),
            deltas.reshape(3, 12, -1),
            proposals.boxes,
            proposals.valid,
            images.sizes_tensor(),
            heads.postprocess,
            heads.box_coder,
        )
    assert sum(len(d.scores) for d in detections) > 0
    for got, want in zip(detections, expected):
        assert torch.allclose(got.boxes, want.boxes, atol=1e-5)
        assert torch.allclose(got.scores, want.scores, atol=1e-6)
        assert torch.equal(got.labels, want.labels)


def test_no_proposal_at_all_gives_empty_detections() -> None:
    model = _model()
    features, proposals, images = _inputs([0, 0])
    with torch.no_grad():
        detections = model.roi_heads(features, proposals, images)
    assert [len(d.scores) for d in detections] == [0, 0]
    assert detections[0].boxes.shape == (0, 4)
