"""RPN head: a 3x3 conv shared by all levels, then per-anchor objectness and box deltas.

Shapes: N images, A anchors per location, Hl x Wl level size, R anchors per image (all levels).
Objectness has two forms:
- softmax (the seed's, jwyang/faster-rcnn.pytorch): 2*A channels, the first A are the background
  scores of anchors 0..A-1 and the next A their foreground scores;
- sigmoid (torchvision, detectron2): A channels, one logit per anchor. A sigmoid logit x is the
  softmax pair (0, x), which is how torchvision weights import into the softmax form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOFTMAX = "softmax"
SIGMOID = "sigmoid"


class RPNHead(nn.Module):
    def __init__(self, in_channels: int, num_anchors: int, objectness: str = SOFTMAX) -> None:
        super().__init__()
        if objectness not in (SOFTMAX, SIGMOID):
            raise ValueError(f"objectness must be '{SOFTMAX}' or '{SIGMOID}', got {objectness!r}")
        self.objectness = objectness
        self.num_anchors = num_anchors
        num_logits = 2 * num_anchors if objectness == SOFTMAX else num_anchors
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_logits, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: logits (N, 2A or A, Hl, Wl) and deltas (N, 4A, Hl, Wl), channel slices of
        one output.

        The two 1x1 convolutions run as one, over their weights concatenated (the parameters
        stay the two layers', as torchvision names them): each level's hidden map is read once,
        and in the backward its gradient is one tensor where two would be made and summed. On
        ResNet-50-FPN that sum, of two P2-sized gradients (32 MB each at 512 px), was the
        training step's memory peak."""
        weight = torch.cat([self.cls_logits.weight, self.bbox_pred.weight])
        bias = torch.cat([self.cls_logits.bias, self.bbox_pred.bias])
        split = self.cls_logits.out_channels
        logits, deltas = [], []
        for feature in features:
            both = F.conv2d(torch.relu(self.conv(feature)), weight, bias)
            logits.append(both[:, :split])
            deltas.append(both[:, split:])
        return logits, deltas

    def flatten(self, logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Concatenate levels in anchor order: logits (N, R, C), C = 2 (softmax) or 1, and
        deltas (N, R, 4), both float32."""
        num_classes = 2 if self.objectness == SOFTMAX else 1
        flat_logits = [_flatten_level(x, num_classes, class_major=True) for x in logits]
        flat_deltas = [_flatten_level(x, 4, class_major=False) for x in deltas]
        return torch.cat(flat_logits, dim=1).float(), torch.cat(flat_deltas, dim=1).float()


def _flatten_level(x: Tensor, channels: int, class_major: bool) -> Tensor:
    n, _, height, width = x.shape
    if class_major:
        # the seed's layout: (N, C*A, H, W) -> (N, C, A, H, W) -> (N, H, W, A, C)
        x = x.view(n, channels, -1, height, width).permute(0, 3, 4, 2, 1)
    else:
        # (N, A*C, H, W) -> (N, A, C, H, W) -> (N, H, W, A, C)
        x = x.view(n, -1, channels, height, width).permute(0, 3, 4, 1, 2)
    return x.reshape(n, -1, channels)  # (N, H, W, A, C) -> (N, H*W*A, C)


def objectness_logit(flat_logits: Tensor) -> Tensor:
    """(N, R, C) -> (N, R): the logit whose sigmoid is P(object); for the softmax pair (b, f) that
    is f - b, since softmax((b, f))[1] = sigmoid(f - b)."""
    if flat_logits.shape[-1] == 2:
        return flat_logits[..., 1] - flat_logits[..., 0]
    return flat_logits[..., 0]
