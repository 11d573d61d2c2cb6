"""Region Proposal Network: head, anchors, anchor targets and losses in training, proposals.

Shapes: N images, R anchors per image, K proposal slots per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from frcnn.modeling.anchors import AnchorGenerator
from frcnn.modeling.rpn.anchor_target import AnchorMatcher, GridSizes, anchor_targets
from frcnn.modeling.rpn.head import RPNHead, objectness_logit
from frcnn.modeling.rpn.loss import rpn_losses
from frcnn.modeling.rpn.proposals import Proposals, ProposalSettings, generate_proposals
from frcnn.structures import BoxCoder, ImageList, Targets


class RPN(nn.Module):
    def __init__(
        self,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        matcher: AnchorMatcher,
        train_settings: ProposalSettings,
        test_settings: ProposalSettings,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        smooth_l1_beta: float = 1.0 / 9.0,
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.train_settings = train_settings
        self.test_settings = test_settings
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_weight = loss_weight
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def forward(
        self, images: ImageList, features: list[Tensor], targets: list[Targets] | None = None
    ) -> tuple[Proposals, dict[str, Tensor]]:
        logits_per_level, deltas_per_level = self.head(features)
        feature_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(
            tuple(images.tensor.shape[-2:]), feature_sizes, images.tensor.device
        )
        grid_sizes = self.anchor_generator.grid_sizes(feature_sizes)  # (Hl, Wl, A) per level
        num_anchors_per_level = [h * w * a for h, w, a in grid_sizes]
        logits, deltas = self.head.flatten(
            logits_per_level, deltas_per_level
        )  # (N, R, C), (N, R, 4)
        settings = self.train_settings if self.training else self.test_settings
        # NMS: a training step makes one call per job on every device, so that its host
        # synchronisations (counted alike on any device, frcnn/engine/sync_count.py) stay as
        # few as the batch grows. At inference a CPU, which has no device to wait for, takes
        # torchvision's batched_nms per job, one kernel call per (image, level) group, as the
        # detections' post-processing does: the CPU kernel compares every box it keeps with
        # every later box of its call, other groups' too (quick start, 4 images a job: about a
        # third less time for the proposal layer)
        proposals = generate_proposals(
            anchors,
            objectness_logit(logits),
            deltas,
            images.sizes_tensor(),
            num_anchors_per_level,
            settings,
            self.box_coder,
            one_call=self.training or deltas.device.type != "cpu",
        )
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training mode")
            losses = self.losses(anchors, logits, deltas, targets, images.image_sizes, grid_sizes)
        return proposals, losses

    def losses(
        self,
        anchors: Tensor,
        logits: Tensor,
        deltas: Tensor,
        targets: list[Targets],
        image_sizes: list[tuple[int, int]],
        grid_sizes: GridSizes | None = None,
    ) -> dict[str, Tensor]:
        with torch.no_grad():
            anchor_target = anchor_targets(
                anchors,
                targets,
                image_sizes,
                self.matcher,
                self.box_coder,
                self.batch_size_per_image,
                self.positive_fraction,
                grid_sizes=grid_sizes,
            )
        losses = rpn_losses(
            logits,
            deltas,
            anchor_target.labels,
            anchor_target.box_targets,
            self.smooth_l1_beta,
            max_sampled_per_image=self.batch_size_per_image,  # the sampler's bound
        )
        return {name: loss * self.loss_weight for name, loss in losses.items()}
