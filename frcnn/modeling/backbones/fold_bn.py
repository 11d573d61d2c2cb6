"""Frozen batch norm folded into the convolution before it: a speed setting (model.fold_frozen_bn).

A FrozenBatchNorm2d after a convolution is a fixed per-channel affine map, y = conv(x, W) * s + t
with s = gamma / sqrt(var + eps) and t = beta - mean * s, which is the convolution
conv(x, W * s) + t. Folded, the pair makes one pass over the activations instead of three
(convolution, multiply, add); the weight product costs a pass over the weights instead. It is
computed at every call from the live parameters and buffers, so loading a checkpoint later and
moving devices work as before, and the state_dict keys are unchanged: the norm layer stays in
place, holding its buffers, and passes its input through.

Where no gradient passes through the convolution (the frozen layers at the bottom of a trunk,
and every layer at inference) the fold is a plain convolution with the folded weight. Where one
does, autograd would save the folded weight for the backward, a second copy of the weight (about
90 MB for ResNet-50's trainable stages); there the fold runs as its own autograd function
(_FoldedConv) that saves the convolution's input and the weight parameter itself, as the
unfolded convolution does, and folds the weight again in the backward. The activations then take
one pass instead of three in the forward, and the backward skips the multiply of the output
gradient by s; the weight takes two more passes (the second fold and the scaling of its
gradient), and each fold makes a folded copy that lives for the one convolution. The unfolded
pair remains where a gradient passes under autocast, which casts inside the convolution, and for
padding given as a string. The function has a first-order backward only: no double backward
(create_graph=True), forward-mode AD or torch.func transforms through a folded trainable layer;
train without the setting for those.

Results equal the unfolded network's up to float rounding (the products are taken in another
order), except under autocast where no gradient passes: unfolded, the frozen norm's float32
statistics promote its output to float32; folded, the convolution's output stays in the autocast
dtype. Pairs are folded only where the forward order is known: consecutive children of an
nn.Sequential or of the IntermediateLayerGetter that torchvision's FPN backbones wrap a trunk in
(not a child whose output it returns), and torchvision's own ResNet, BasicBlock and Bottleneck
(conv1 -> bn1, conv2 -> bn2, ...; not subclasses, whose forward may differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d

# torchvision modules that apply conv{i} then bn{i} directly, for every i they have
# (nn.Sequential and IntermediateLayerGetter, the trunk of torchvision's BackboneWithFPN, apply
# their children one after another)
_NAMED_PAIRS = (ResNet, BasicBlock, Bottleneck)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose affine map the convolution before it applies: the identity,
    keeping its buffers (and so its state_dict entries)."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale


class ConvFrozenBN2d(nn.Conv2d):
    """A Conv2d followed by the affine map of ``norm``, in one convolution. ``norm`` is held
    without being registered, so that its buffers keep their own state_dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.norm.scale_and_shift()
        wants_grad = torch.is_grad_enabled() and (
            self.weight.requires_grad
            or x.requires_grad
            or (self.bias is not None and self.bias.requires_grad)
        )
        if wants_grad and (_autocast_on(x.device.type) or isinstance(self.padding, str)):
            # autocast casts inside the convolution, which _FoldedConv's backward would have to
            # redo by hand, and its backward takes padding in pixels: the unfolded pair there
            out = self._conv_forward(x, self.weight, self.bias)
            return out * scale.reshape(-1, 1, 1) + shift.reshape(-1, 1, 1)
        if wants_grad:
            settings = (self.stride, self.padding, self.dilation, self.groups)
            return _FoldedConv.apply(x, self.weight, self.bias, scale, shift, settings)
        weight = _folded_weight(self.weight, scale)
        return self._conv_forward(x, weight, _folded_bias(self.bias, scale, shift))

    @property
    def norm(self) -> FoldedFrozenBatchNorm2d:
        return self.__dict__["_norm"]


def _folded_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """W * s: the norm's scale on each output channel's filter."""
    return weight * scale.reshape(-1, 1, 1, 1)


def _folded_bias(bias: Tensor | None, scale: Tensor, shift: Tensor) -> Tensor:
    """b * s + t (t alone for a convolution without a bias)."""
    return shift if bias is None else bias * scale + shift


def _autocast_on(device_type: str) -> bool:
    """Autocast enabled for the device type (never on the meta device, which has none)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class _FoldedConv(torch.autograd.Function):
    """conv(x, W * s) + (b * s + t) with a gradient, saving x and W (the convolution's own
    operands, W the parameter itself) rather than the folded weight: the backward folds the
    weight again. Its gradients are the convolution's, through the fold: dL/dW = s * dL/d(W s),
    dL/db = s * dL/d(b s + t)."""

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        scale: Tensor,
        shift: Tensor,
        settings: tuple,
    ) -> Tensor:
        stride, padding, dilation, groups = settings
        folded, folded_bias = _folded_weight(weight, scale), _folded_bias(bias, scale, shift)
        out = F.conv2d(x, folded, folded_bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, scale)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.settings
        wants = ctx.needs_input_grad
        folded = _folded_weight(weight, scale)
        grad_x, grad_folded, grad_bias = torch.ops.aten.convolution_backward(
            grad,
            x,
            folded,
            [weight.shape[0]] if ctx.has_bias else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0] * len(stride),
            groups,
            [wants[0], wants[1], ctx.has_bias and wants[2]],
        )
        grad_weight = grad_folded.mul_(scale.reshape(-1, 1, 1, 1)) if wants[1] else None
        grad_bias = grad_bias.mul_(scale) if ctx.has_bias and wants[2] else None
        return (grad_x if wants[0] else None, grad_weight, grad_bias, None, None, None)


def fold_frozen_batch_norm(module: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d that directly follows a Conv2d (see the module docstring) into
    it, in place. Returns the number of pairs folded."""
    folded = 0
    for parent in list(module.modules()):
        for conv_name, norm_name in _pairs(parent):
            conv, norm = parent._modules[conv_name], parent._modules[norm_name]
            if type(conv) is not nn.Conv2d or type(norm) is not FrozenBatchNorm2d:
                continue
            if conv.padding_mode != "zeros" or norm.weight.shape[0] != conv.out_channels:
                continue
            parent._modules[norm_name] = _folded_norm(norm)
            parent._modules[conv_name] = _folded_conv(conv, parent._modules[norm_name])
            folded += 1
    return folded


def _pairs(parent: nn.Module) -> list[tuple[str, str]]:
    names = list(parent._modules)
    if isinstance(parent, IntermediateLayerGetter):  # its returned outputs must stay unfolded
        returned = set(parent.return_layers)
        return [(a, b) for a, b in zip(names, names[1:]) if a not in returned]
    if isinstance(parent, nn.Sequential):
        return list(zip(names, names[1:]))
    if type(parent) in _NAMED_PAIRS:
        return [(n, "bn" + n[4:]) for n in names if n.startswith("conv") and "bn" + n[4:] in names]
    return []


def _folded_norm(norm: FrozenBatchNorm2d) -> FoldedFrozenBatchNorm2d:
    folded = FoldedFrozenBatchNorm2d(norm.weight.shape[0], eps=norm.eps)
    for name, buffer in norm.named_buffers(recurse=False):
        setattr(folded, name, buffer)  # the same tensors: same device, dtype and values
    return folded


def _folded_conv(conv: nn.Conv2d, norm: FoldedFrozenBatchNorm2d) -> ConvFrozenBN2d:
    with torch.device("meta"):  # no throwaway initialisation; the parameters are conv's own
        folded = ConvFrozenBN2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
        )
    folded.weight = conv.weight
    if conv.bias is not None:
        folded.bias = conv.bias
    folded.__dict__["_norm"] = norm
    folded.train(conv.training)
    return folded
