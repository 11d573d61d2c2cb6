"""RPN losses, the mathematics of the seed (jwyang/faster-rcnn.pytorch) without its host syncs.

Shapes: N images, R anchors per image, C = 2 (softmax pair) or 1 (sigmoid logit).

rpn_loss_cls: cross-entropy over every sampled anchor of the batch (labels 1 / 0), anchors labelled
IGNORE (-1) left out. The seed drops them with ``ne(-1).nonzero()`` + ``index_select`` and takes the
mean; ``ignore_index`` with a sum divided by the count of kept anchors is the same number and never
waits for the device (and gives 0, not NaN, when every anchor is ignored).

rpn_loss_box: smooth-L1 with sigma = 3 (beta = 1 / sigma**2) on the positive anchors (inside
weights), each image's sum divided by its own count of sampled anchors (outside weights), then the
mean over images. (The seed normalises every image by the last image's count; that is a bug.)

Both are sums over the sampled anchors, so ``rpn_losses`` may first gather each image's sampled
anchors (at most ``max_sampled_per_image``, the anchor-target layer's batch size) into a fixed
(N, K) slice: a top-k of the sampled mask, K static, no host read. Autograd then keeps (N, K)
tensors for the backward instead of (N, R) ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from frcnn.structures import IGNORE, POSITIVE


def rpn_loss_cls(logits: Tensor, labels: Tensor) -> Tensor:
    """``logits`` (N, R, C), ``labels`` (N, R) in {1, 0, -1} -> scalar."""
    labels = labels.reshape(-1)
    num_sampled = (labels != IGNORE).sum().clamp(min=1)
    if logits.shape[-1] == 2:
        loss = F.cross_entropy(
            logits.reshape(-1, 2).float(), labels, ignore_index=IGNORE, reduction="sum"
        )
    else:
        per_anchor = F.binary_cross_entropy_with_logits(
            logits.reshape(-1).float(), labels.clamp(min=0).float(), reduction="none"
        )
        loss = per_anchor.masked_fill(labels == IGNORE, 0.0).sum()
    return loss / num_sampled


def rpn_loss_box(deltas: Tensor, box_targets: Tensor, labels: Tensor, beta: float) -> Tensor:
    """``deltas`` and ``box_targets`` (N, R, 4), ``labels`` (N, R) -> scalar (R: every anchor, or
    the K gathered by rpn_losses)."""
    # smooth_l1(x, y) is a function of x - y: given the difference and a broadcast zero, autograd
    # keeps one (N, R, 4) tensor for the backward instead of both operands
    difference = deltas.float() - box_targets
    zero = difference.new_zeros(()).expand_as(difference)
    per_anchor = F.smooth_l1_loss(difference, zero, beta=beta, reduction="none").sum(-1)
    positive = labels == POSITIVE
    num_sampled_per_image = (labels != IGNORE).sum(dim=1).clamp(min=1)  # (N,)
    per_image = per_anchor.masked_fill(~positive, 0.0).sum(dim=1) / num_sampled_per_image
    return per_image.mean()


def rpn_losses(
    logits: Tensor,
    deltas: Tensor,
    labels: Tensor,
    box_targets: Tensor,
    beta: float = 1.0 / 9.0,
    max_sampled_per_image: int | None = None,
) -> dict[str, Tensor]:
    """Both losses. ``max_sampled_per_image``, when given, must bound every image's count of
    anchors not labelled IGNORE (the sampler's batch size does): the losses are then computed on
    the gathered sampled anchors only, the same sums over fewer zeros."""
    if max_sampled_per_image is not None and max_sampled_per_image < labels.shape[1]:
        logits, deltas, labels, box_targets = _gather_sampled(
            max_sampled_per_image, logits, deltas, labels, box_targets
        )
    return {
        "rpn_loss_cls": rpn_loss_cls(logits, labels),
        "rpn_loss_box": rpn_loss_box(deltas, box_targets, labels, beta),
    }


def _gather_sampled(k: int, logits: Tensor, deltas: Tensor, labels: Tensor, box_targets: Tensor):
    """(N, R, ...) -> (N, k, ...): every sampled anchor of each image (at most ``k`` of them) and
    ignored anchors to fill the rest, which both losses leave out.

    index_select on the flattened batch, not gather: gather's backward keeps its whole (N, R, ...)
    input alive, index_select's only the (N * k) indices."""
    num_images, num_anchors = labels.shape
    index = (labels != IGNORE).to(torch.uint8).topk(k, dim=1, sorted=False).indices  # (N, k)
    flat = (index + torch.arange(num_images, device=index.device)[:, None] * num_anchors).view(-1)

    def pick(values: Tensor) -> Tensor:
        rows = values.reshape(num_images * num_anchors, *values.shape[2:]).index_select(0, flat)
        return rows.view(num_images, k, *values.shape[2:])

    return pick(logits), pick(deltas), pick(labels), pick(box_targets)
