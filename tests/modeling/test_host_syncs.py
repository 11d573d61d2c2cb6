"""Host synchronisations in one training step (forward, backward): counted, not timed.

frcnn reads the host for the candidate count and the result of each NMS call, one call per
worker's range of images (one on an accelerator, one per thread on a CPU), and with FPN levels
once more for the RoI pooler's per-level counts. The count must not grow with the batch or the
number of levels, and must stay below torchvision's FasterRCNN on the same step.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchors
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from frcnn.build import build_model
from frcnn.config import AnchorConfig, BackboneConfig, ModelConfig, ROIHeadsConfig, RPNConfig
from frcnn.engine.sync_count import HostSyncCount, count_host_syncs
from frcnn.modeling import parallel
from frcnn.modeling.backbones import small_backbone
from frcnn.structures import Targets

SIZE = 64


def _expected(backbone: str, workers: int) -> dict[str, int]:
    """One NMS call per worker's range of images: its candidates and its result are read; with FPN
    levels the RoI pooler reads its per-level counts once."""
    expected = {"aten.nonzero": workers, "torchvision.nms": workers}
    if backbone.endswith("fpn"):
        expected["Tensor.tolist"] = 1
    return expected


def _config(backbone: str) -> ModelConfig:
    fpn = backbone.endswith("fpn")
    sizes = [[16.0], [32.0], [64.0], [128.0], [256.0]] if fpn else [[16.0, 32.0]]
    return ModelConfig(
        num_classes=3,
        backbone=BackboneConfig(
            name=backbone, norm="frozen_bn" if fpn else "bn", channels=32, trainable_layers=3
        ),
        anchors=AnchorConfig(sizes=sizes, aspect_ratios=[[0.5, 1.0, 2.0]]),
        # enough NMS candidates at batch 8 (> 4000) that torchvision's batched_nms would loop
        rpn=RPNConfig(pre_nms_topk_train=300, post_nms_topk_train=50, batch_size_per_image=64),
        roi_heads=ROIHeadsConfig(representation_size=32, batch_size_per_image=16),
    )


def _batch(num_images: int) -> tuple[list[torch.Tensor], list[Targets]]:
    generator = torch.Generator().manual_seed(num_images)
    images = [torch.rand(3, SIZE, SIZE, generator=generator) for _ in range(num_images)]
    targets = []
    for index in range(num_images):
        count = index % 3 + 1  # different ground-truth counts per image
        corner = torch.rand(count, 2, generator=generator) * SIZE / 2
        boxes = torch.cat([corner, corner + 8 + torch.rand(count, 2, generator=generator) * 20], 1)
        targets.append(Targets(boxes, torch.randint(1, 4, (count,), generator=generator)))
    return images, targets


def _count(model: torch.nn.Module, images: list, targets: list) -> HostSyncCount:
    model.train()
    sum(model(images, targets).values()).backward()  # first-call work is not the step's
    with count_host_syncs() as syncs:
        sum(model(images, targets).values()).backward()
    return syncs


@pytest.mark.parametrize("workers", [1, 2], ids=["accelerator", "2-thread-cpu"])
@pytest.mark.parametrize("backbone", ["small", "resnet18_fpn"])
def test_training_step_syncs_stay_the_same_as_the_batch_grows(
    backbone: str, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one job at a time is what an accelerator runs; a CPU runs one per thread
    monkeypatch.setattr(parallel, "num_workers", lambda device: workers)
    torch.manual_seed(0)
    model = build_model(_config(backbone))
    for num_images in (workers, 2, 8):  # 8 images: > 4000 NMS candidates
        syncs = _count(model, *_batch(num_images))
        assert dict(syncs.by_call) == _expected(backbone, workers), (num_images, syncs)


def _torchvision_twin() -> TorchvisionFasterRCNN:
    """torchvision's detector on the same small backbone and settings as _config("small")."""
    backbone = small_backbone(32, "bn")
    return TorchvisionFasterRCNN(
        backbone,
        num_classes=None,
        min_size=SIZE,
        max_size=SIZE,
        rpn_anchor_generator=TorchvisionAnchors(((16, 32),), ((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=50,
        rpn_batch_size_per_image=64,
        box_roi_pool=MultiScaleRoIAlign([backbone.feature_name], 7, 2),
        box_head=TwoMLPHead(32 * 7 * 7, 32),
        box_predictor=FastRCNNPredictor(32, 4),
        box_batch_size_per_image=16,
    )


def test_frcnn_synchronises_less_than_torchvision() -> None:
    torch.manual_seed(0)
    ours = build_model(_config("small"))
    theirs = _torchvision_twin()
    images, targets = _batch(2)
    dicts = [{"boxes": t.boxes, "labels": t.labels} for t in targets]
    ours_count = _count(ours, images, targets).total
    theirs_count = _count(theirs, images, dicts).total
    assert ours_count < theirs_count, (ours_count, theirs_count)
