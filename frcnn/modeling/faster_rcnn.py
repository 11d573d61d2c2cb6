"""Faster R-CNN (Ren et al., 2015): backbone, region proposal network, RoI heads.

Shapes: N images; images arrive as a list of (3, Hi, Wi) tensors, uint8 in [0, 255] or float in
[0, 1], already resized by the data pipeline; they are normalised and zero padded here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from frcnn.modeling.roi_heads.roi_heads import ROIHeads
from frcnn.modeling.rpn.rpn import RPN
from frcnn.structures import Detections, ImageList, Targets, batch_images, scale_boxes


class FasterRCNN(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        rpn: RPN,
        roi_heads: ROIHeads,
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisibility: int = 32,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility
        self.channels_last = channels_last

    def forward(
        self,
        images: list[Tensor],
        targets: list[Targets] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[Detections]:
        """Training: the four losses. Inference: one Detections per image, in the pixels of
        ``original_sizes`` when given (the sizes before the data pipeline's resize)."""
        if self.training and targets is None:
            raise ValueError("FasterRCNN needs targets in training mode")
        image_list = self.preprocess(images)
        features = self.backbone(image_list.tensor)
        proposals, rpn_losses = self.rpn(image_list, list(features.values()), targets)
        outputs = self.roi_heads(features, proposals, image_list, targets)
        if self.training:
            return {**rpn_losses, **outputs}
        if original_sizes is not None:
            outputs = rescale_detections(outputs, image_list.image_sizes, original_sizes)
        return outputs

    def compile_static_modules(self, backend: str | Callable[..., Any] = "inductor") -> None:
        """torch.compile, in place, the compute-heavy modules: the backbone, the RPN head, the box
        head and predictor. Not the whole forward: NMS, sampling and the host reads between the
        stages would break the graph at every call. A new input size recompiles once, after
        which torch.compile treats that size as dynamic: the box head's row count changes from
        call to call (proposal slots follow what NMS kept; at inference the head runs on each
        RoIAlign job's block of rows).

        In place (nn.Module.compile) keeps the state_dict keys, so checkpoints load with the
        switch on or off. ``backend`` is torch.compile's; tests pass a backend that only traces
        ("eager") to skip code generation."""
        heavy = (
            self.backbone,
            self.rpn.head,
            self.roi_heads.box_head,
            self.roi_heads.box_predictor,
        )
        for module in heavy:
            module.compile(backend=backend)

    def preprocess(self, images: list[Tensor]) -> ImageList:
        normalized = []
        for image in images:
            image = image.to(self.pixel_mean.device, non_blocking=True)
            image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            normalized.append((image - self.pixel_mean) / self.pixel_std)
        image_list = batch_images(normalized, self.size_divisibility)
        if self.channels_last:
            image_list.tensor = image_list.tensor.contiguous(memory_format=torch.channels_last)
        return image_list


def rescale_detections(
    detections: list[Detections],
    image_sizes: Sequence[tuple[int, int]],
    original_sizes: Sequence[tuple[int, int]],
) -> list[Detections]:
    """Map boxes from the network's input size back to each image's original size."""
    rescaled = []
    for det, (height, width), (orig_h, orig_w) in zip(detections, image_sizes, original_sizes):
        boxes = scale_boxes(det.boxes, orig_h / height, orig_w / width)
        rescaled.append(Detections(boxes, det.scores, det.labels))
    return rescaled
