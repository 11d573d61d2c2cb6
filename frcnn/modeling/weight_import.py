"""Import torchvision Faster R-CNN checkpoints.

torchvision's detection state_dicts already follow frcnn's module layout (``backbone.body`` /
``backbone.fpn``, ``roi_heads.box_head.fc6``, ``roi_heads.box_predictor``), except the RPN head's
3x3 conv (``conv.0.0`` there) and, for a softmax RPN, the objectness layer: a sigmoid logit x is
the softmax pair (0, x), so the background rows are zero and the foreground rows are torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

_RPN_CONV = {
    "rpn.head.conv.0.0.weight": "rpn.head.conv.weight",
    "rpn.head.conv.0.0.bias": "rpn.head.conv.bias",
}


def convert_torchvision_state_dict(
    state: dict[str, Tensor], objectness: str = "sigmoid"
) -> dict[str, Tensor]:
    """torchvision ``FasterRCNN.state_dict()`` -> frcnn ``FasterRCNN.state_dict()``.

    ``objectness`` is the target model's RPN form ('sigmoid' keeps the A logits, 'softmax' makes
    the 2A-channel layout of rpn/head.py). Batch-norm step counters are dropped: frcnn freezes the
    statistics of pretrained trunks.
    """
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = _RPN_CONV.get(key, key)
        converted[key] = value
    if objectness == "softmax":
        for name in ("weight", "bias"):
            fg = converted[f"rpn.head.cls_logits.{name}"]
            converted[f"rpn.head.cls_logits.{name}"] = torch.cat([torch.zeros_like(fg), fg])
    elif objectness != "sigmoid":
        raise ValueError(f"objectness must be 'sigmoid' or 'softmax', got {objectness!r}")
    return converted


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a FrozenBatchNorm2d holding its statistics and
    affine parameters (in place; returns ``module``). torchvision runs its pretrained detectors
    with FrozenBatchNorm2d at its default eps 1e-5 (also for MobileNetV3, whose BatchNorm2d uses
    1e-3); a detector built without weights has BatchNorm2d instead."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features)
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, buffer).copy_(getattr(child, buffer).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module
