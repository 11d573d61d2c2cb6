"""RoI heads: proposal targets and losses in training, detections at inference.

Shapes: N images, K proposal slots per image, S sampled RoIs per image, C foreground classes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from frcnn.modeling.roi_heads.loss import rcnn_losses
from frcnn.modeling.roi_heads.poolers import in_roi_order
from frcnn.modeling.roi_heads.postprocess import PostprocessSettings, postprocess_detections
from frcnn.modeling.roi_heads.proposal_target import ProposalTargetSettings, sample_proposals
from frcnn.modeling.rpn.proposals import Proposals
from frcnn.structures import BoxCoder, Detections, ImageList, Targets


class ROIHeads(nn.Module):
    def __init__(
        self,
        pooler: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        sampling: ProposalTargetSettings,
        postprocess: PostprocessSettings,
        bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta: float = 1.0,
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.pooler = pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.sampling = sampling
        self.postprocess = postprocess
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_weight = loss_weight

    def forward(
        self,
        features: OrderedDict[str, Tensor],
        proposals: Proposals,
        images: ImageList,
        targets: list[Targets] | None = None,
    ) -> list[Detections] | dict[str, Tensor]:
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads need targets in training mode")
            with torch.no_grad():
                samples = sample_proposals(proposals, targets, self.sampling, self.box_coder)
            # the losses are sums over RoIs: the labels follow the pooler's row order
            class_logits, box_deltas, order = self._predict(features, samples.boxes, images)
            labels, box_targets = samples.labels.reshape(-1), samples.box_targets.reshape(-1, 4)
            if order is not None:
                labels, box_targets = labels[order], box_targets[order]
            losses = rcnn_losses(class_logits, box_deltas, labels, box_targets, self.smooth_l1_beta)
            return {name: loss * self.loss_weight for name, loss in losses.items()}
        # filled slots come first in every image: the box head skips the slots no image fills
        # (inference only; the one host read here replaces up to K box-head rows of zeros)
        num_slots = int(proposals.valid.sum(dim=1).max()) if proposals.valid.numel() else 0
        boxes, valid = proposals.boxes[:, :num_slots], proposals.valid[:, :num_slots]
        class_logits, box_deltas, order = self._predict(features, boxes, images)
        class_logits, box_deltas = in_roi_order(order, class_logits, box_deltas)
        num_images = boxes.shape[0]
        return postprocess_detections(
            class_logits.reshape(num_images, num_slots, class_logits.shape[-1]),
            box_deltas.reshape(num_images, num_slots, box_deltas.shape[-1]),
            boxes,
            valid,
            images.sizes_tensor(),
            self.postprocess,
            self.box_coder,
        )

    def _predict(
        self, features: OrderedDict[str, Tensor], boxes: Tensor, images: ImageList
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(N, S, 4) RoIs -> class logits (N*S, C+1), box deltas (N*S, 4(C+1)) and the pooler's
        row order (row i is RoI order[i]; None: RoI order). The pooler is Single- or
        MultiLevelPooler (``pool_blocks``).

        At inference the box head runs on each block of pooled rows the pooler's jobs made, and
        only its small outputs are joined: no copy of the pooled features. In training the
        blocks are joined first: run per block, the head's backward would build a full weight
        gradient per block (fc6 of the FPN head: 51 MB each) and batch norm would see part of
        the rows."""
        blocks, order = self.pooler.pool_blocks(
            features, boxes, images.image_sizes, _padded_size(images)
        )
        if len(blocks) > 1 and self.training:
            blocks = (torch.cat(blocks),)
        outputs = [self.box_predictor(self.box_head(block)) for block in blocks]
        if len(outputs) == 1:
            return (*outputs[0], order)
        class_logits, box_deltas = zip(*outputs)
        return torch.cat(class_logits), torch.cat(box_deltas), order


def _padded_size(images: ImageList) -> tuple[int, int]:
    return int(images.tensor.shape[-2]), int(images.tensor.shape[-1])
