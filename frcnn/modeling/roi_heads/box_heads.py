"""Box heads (pooled RoI features -> one vector per RoI) and the box predictor.

Shapes: M RoIs (all images), Ch x P x P pooled features, D representation size, K foreground
classes (K + 1 logits with background at index 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# the input dtypes autocast casts to its lower precision (not float64)
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


class _InputReleasingLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` whose backward computes the weight and bias gradients first and
    then lets go of ``x``, before it allocates the gradient of ``x``.

    nn.Linear's backward holds ``x``, the gradient of ``x`` and the weight gradient at once. In a
    box head's first layer ``x`` is every RoI's pooled features (quick start: 512 x 6272 floats,
    12.25 MB; ResNet-50-FPN at batch 2: 1024 x 12544, 51 MB), and that moment is the training
    step's memory peak. The same products, in another order: the peak is ``x`` or its gradient,
    never both. The early release is skipped when the graph is kept (``retain_graph=True``):
    ``ctx.maybe_clear_saved_tensors`` frees the saved tensors only when autograd would free them
    after this node anyway."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        grad_weight = grad.t().mm(x) if needs_weight else None
        grad_bias = grad.sum(0) if needs_bias and ctx.has_bias else None
        del x
        release = getattr(ctx, "maybe_clear_saved_tensors", None)  # torch >= 2.3
        if release is not None:
            release()
        grad_x = grad.mm(weight) if needs_x else None
        return grad_x, grad_weight, grad_bias


class InputReleasingLinear(nn.Linear):
    """nn.Linear (same parameters and state_dict keys) for 2-D inputs whose training backward
    frees the input before it computes the input's gradient (_InputReleasingLinear). Inference,
    grad-free calls and torch.compile (whose compiled backward frees saved tensors itself) use
    nn.Linear's own path."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        weight, bias = self.weight, self.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):  # autocast's own casts, recorded by autograd
            dtype = torch.get_autocast_dtype(device)
            x, weight = (t.to(dtype) if t.dtype in _AUTOCAST_ELIGIBLE else t for t in (x, weight))
            if bias is not None and bias.dtype in _AUTOCAST_ELIGIBLE:
                bias = bias.to(dtype)
            with torch.autocast(device, enabled=False):
                return _InputReleasingLinear.apply(x, weight, bias)
        return _InputReleasingLinear.apply(x, weight, bias)


class MLP2Head(nn.Module):
    """Two fully connected layers (the FPN paper's 2-MLP head; torchvision's TwoMLPHead). fc6
    frees its input, the pooled features, early in the backward (InputReleasingLinear).

    Without gradients (inference), pooled features laid out channels_last (the sparse RoIAlign
    kernel's blocks: (M, Ch, P, P) stored as (M, P, P, Ch)) are flattened in that memory order,
    a view, and fc6 takes its weight with the columns permuted to match, rather than every
    pooled row being transposed into Ch-major order first: the same sums in another order,
    equal to rounding, and the weight (quick start 256 x 6272) is smaller than the rows (2400 x
    6272). In training the rows are flattened as usual (a copy, which fc6 keeps for its
    backward in place of the pooled tensor): a permuted weight would be kept beside the
    weight, and its gradient permuted back.
    """

    def __init__(self, in_features: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = InputReleasingLinear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_features = representation_size

    def forward(self, pooled: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and pooled.dim() == 4 and _channels_last_only(pooled):
            rows = pooled.permute(0, 2, 3, 1).flatten(1)  # (M, P * P * Ch), a view
            weight = self.fc6.weight.unflatten(1, pooled.shape[1:]).permute(0, 2, 3, 1)
            hidden = nn.functional.linear(rows, weight.flatten(1), self.fc6.bias)
        else:
            hidden = self.fc6(pooled.flatten(1))
        return nn.functional.relu(self.fc7(nn.functional.relu(hidden)))


def _channels_last_only(pooled: Tensor) -> bool:
    """(M, Ch, P, P) stored as (M, P, P, Ch), and not also Ch-major (Ch = 1, P = 1 or M = 0:
    either flattening is a view)."""
    return pooled.is_contiguous(memory_format=torch.channels_last) and not pooled.is_contiguous()


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
