"""Box heads (pooled RoI features -> one vector per RoI) and the box predictor.

Shapes: M RoIs (all images), Ch x P x P pooled features, D representation size, K foreground
classes (K + 1 logits with background at index 0).
"""

from __future__ import annotations

from torch import Tensor, nn


class MLP2Head(nn.Module):
    """Two fully connected layers (the FPN paper's 2-MLP head; torchvision's TwoMLPHead)."""

    def __init__(self, in_features: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_features = representation_size

    def forward(self, pooled: Tensor) -> Tensor:
        hidden = nn.functional.relu(self.fc6(pooled.flatten(1)))
        return nn.functional.relu(self.fc7(hidden))


class SequentialHead(nn.Module):
    """A trunk's own top layers as the box head: VGG16's fc6/fc7 or ResNet's res5 + global
    average pooling (the paper's C4 design). ``flatten`` flattens the pooled map first (VGG)."""

    def __init__(self, layers: nn.Module, out_features: int, flatten: bool) -> None:
        super().__init__()
        self.layers = layers
        self.out_features = out_features
        self.flatten = flatten

    def forward(self, pooled: Tensor) -> Tensor:
        if self.flatten:
            return self.layers(pooled.flatten(1))
        return self.layers(pooled).mean(dim=(2, 3))  # (M, 2048, p, p) -> (M, 2048)


class BoxPredictor(nn.Module):
    """Class logits (M, K + 1) and box deltas (M, 4 * (K + 1)), or (M, 4) class-agnostic."""

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 if class_agnostic else 4 * (num_classes + 1))
        self.class_agnostic = class_agnostic
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(features), self.bbox_pred(features)
