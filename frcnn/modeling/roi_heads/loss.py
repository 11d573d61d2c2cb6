"""Box-head losses. Shapes: M sampled RoIs of the whole batch, K + 1 classes.

rcnn_loss_cls: cross-entropy over the sampled RoIs (unfilled slots, labelled IGNORE, left out).
rcnn_loss_box: smooth-L1 between the deltas predicted for the RoI's own class and its targets,
summed over foreground RoIs and divided by the number of sampled RoIs (jwyang, torchvision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from frcnn.structures import IGNORE


def rcnn_losses(
    class_logits: Tensor, box_deltas: Tensor, labels: Tensor, box_targets: Tensor, beta: float
) -> dict[str, Tensor]:
    """``class_logits`` (M, K+1), ``box_deltas`` (M, 4(K+1)) or (M, 4), ``labels`` (M,),
    ``box_targets`` (M, 4)."""
    num_sampled = (labels != IGNORE).sum().clamp(min=1)
    loss_cls = (
        F.cross_entropy(class_logits.float(), labels, ignore_index=IGNORE, reduction="sum")
        / num_sampled
    )
    deltas = box_deltas.float().reshape(box_deltas.shape[0], -1, 4)  # (M, K+1 or 1, 4)
    if deltas.shape[1] > 1:
        rows = torch.arange(deltas.shape[0], device=deltas.device)
        deltas = deltas[rows, labels.clamp(min=0)]
    else:
        deltas = deltas[:, 0]
    per_roi = F.smooth_l1_loss(deltas, box_targets, beta=beta, reduction="none").sum(-1)
    loss_box = per_roi.masked_fill(labels <= 0, 0.0).sum() / num_sampled
    return {"rcnn_loss_cls": loss_cls, "rcnn_loss_box": loss_box}
