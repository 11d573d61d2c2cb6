"""model.fold_frozen_bn: every frozen batch norm after a convolution folded into it, with the
unfolded model as the reference: the same state_dict keys, the same losses, gradients and
detections up to float rounding, before and after a checkpoint is loaded."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from frcnn.build import build_model
from frcnn.config import AnchorConfig, BackboneConfig, ModelConfig, ROIHeadsConfig, RPNConfig
from frcnn.modeling.backbones.fold_bn import (
    ConvFrozenBN2d,
    FoldedFrozenBatchNorm2d,
    fold_frozen_batch_norm,
)
from frcnn.structures import Targets

FPN_SIZES = [[32.0], [64.0], [128.0], [256.0], [512.0]]


def _config(backbone: str, fold: bool, norm: str = "frozen_bn") -> ModelConfig:
    fpn = backbone.endswith("fpn")
    return ModelConfig(
        num_classes=3,
        fold_frozen_bn=fold,
        backbone=BackboneConfig(name=backbone, norm=norm, trainable_layers=3, channels=32),
        anchors=AnchorConfig(
            sizes=FPN_SIZES if fpn else [[32.0, 64.0, 128.0]], aspect_ratios=[[0.5, 1.0, 2.0]]
        ),
        rpn=RPNConfig(pre_nms_topk_train=100, post_nms_topk_train=50, post_nms_topk_test=50),
        roi_heads=ROIHeadsConfig(
            box_head="res5" if backbone.endswith("c4") else "mlp2",
            representation_size=64,
            pooler_resolution=4 if backbone.endswith("c4") else 7,
            batch_size_per_image=16,
        ),
    )


def _pair(backbone: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The unfolded model with BN statistics that are not the identity, and the folded one with
    the same state."""
    torch.manual_seed(0)
    plain = build_model(_config(backbone, fold=False))
    generator = torch.Generator().manual_seed(1)
    for module in plain.modules():
        if isinstance(module, FrozenBatchNorm2d):
            channels = module.weight.shape[0]
            module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    folded = build_model(_config(backbone, fold=True))
    folded.load_state_dict(plain.state_dict(), strict=True)
    return plain, folded


def _batch() -> tuple[list[torch.Tensor], list[Targets]]:
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 128, 160, generator=generator) for _ in range(2)]
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 150.0, 120.0]])
    return images, [Targets(boxes, torch.tensor([1, 3])), Targets(boxes[1:], torch.tensor([2]))]


@pytest.mark.parametrize("backbone", ["resnet18_fpn", "resnet50_c4", "mobilenet_v3_large_fpn"])
def test_every_frozen_batch_norm_is_folded_and_the_keys_stay(backbone: str) -> None:
    plain, folded = _pair(backbone)
    norms = sum(isinstance(m, FrozenBatchNorm2d) for m in plain.modules())
    assert norms > 0
    assert sum(isinstance(m, FoldedFrozenBatchNorm2d) for m in folded.modules()) == norms
    assert sum(isinstance(m, ConvFrozenBN2d) for m in folded.modules()) == norms
    assert list(plain.state_dict()) == list(folded.state_dict())


@pytest.mark.parametrize("backbone", ["resnet18_fpn", "resnet50_c4"])
def test_folded_training_step_equals_the_unfolded_one(backbone: str) -> None:
    """In float64, where rounding cannot hide a wrong fold: the same losses and gradients. (In
    float32 the two differ by rounding, which a deep trunk amplifies to about 1e-3 of a
    gradient's largest element.)"""
    plain, folded = (model.double() for model in _pair(backbone))
    images, targets = _batch()
    images = [image.double() for image in images]
    results = []
    for model in (plain, folded):
        torch.manual_seed(3)  # the same proposals and samples
        losses = model.train()(images, targets)
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (plain_losses, plain_grads), (folded_losses, folded_grads) = results
    torch.testing.assert_close(folded_losses, plain_losses, rtol=1e-10, atol=1e-12)
    assert plain_grads.keys() == folded_grads.keys()
    assert sum(".conv" in name for name in plain_grads) > 5  # folded convolutions train
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(folded_grads[name], grad, rtol=0, atol=1e-10 * scale + 1e-15)


def test_folded_detections_follow_a_checkpoint_loaded_after_folding() -> None:
    """The folded weight is computed from the live parameters and buffers: a checkpoint loaded
    into a folded model (another model's state, other BN statistics) gives that model's
    detections, and the fold survives deepcopy (the folded conv keeps its own norm layer)."""
    plain, folded = _pair("resnet18_fpn")
    other = build_model(_config("resnet18_fpn", fold=False)).eval()
    images, _ = _batch()
    folded = copy.deepcopy(folded).eval()
    folded.load_state_dict(other.state_dict(), strict=True)
    for module in folded.modules():
        if isinstance(module, ConvFrozenBN2d):
            assert any(module.norm is m for m in folded.modules())
    with torch.no_grad():
        # the backbone's features: detections above a score threshold could differ by one box
        expected = other.backbone(other.preprocess(images).tensor)
        ours = folded.backbone(folded.preprocess(images).tensor)
        before = plain.eval().backbone(plain.preprocess(images).tensor)
    assert not torch.allclose(before["0"], expected["0"], rtol=1e-2, atol=1e-2)  # a new state
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-4)


def test_folding_with_channels_last() -> None:
    plain, _ = _pair("resnet18_fpn")
    folded = build_model(
        dataclasses.replace(_config("resnet18_fpn", fold=True), channels_last=True)
    ).eval()
    folded.load_state_dict(plain.state_dict())
    images, _ = _batch()
    with torch.no_grad():
        expected = plain.eval().backbone(plain.preprocess(images).tensor)
        ours = folded.backbone(folded.preprocess(images).tensor)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("backbone", "norm"), [("resnet18_fpn", "bn"), ("small", "bn")])
def test_nothing_to_fold_is_an_error_naming_the_setting(backbone: str, norm: str) -> None:
    with pytest.raises(ValueError, match="model.fold_frozen_bn"):
        build_model(_config(backbone, fold=True, norm=norm))


def test_a_gradient_keeps_no_copy_of_the_weight() -> None:
    """With a gradient to take, autograd would save a folded weight for the backward: a copy of
    the weight. A trainable layer, or a frozen one whose input takes a gradient, keeps no tensor
    of the weight's size but the weight itself; a frozen layer on a gradient-free input keeps
    nothing. Each computes the conv-then-norm values."""
    _, folded = _pair("resnet18_fpn")
    convs = [m for m in folded.modules() if isinstance(m, ConvFrozenBN2d)]
    trainable = next(m for m in convs if m.weight.requires_grad)
    frozen = next(m for m in convs if not m.weight.requires_grad)
    for conv, input_grad in ((trainable, False), (frozen, True), (frozen, False)):
        saved: list[torch.Tensor] = []
        x = torch.randn(1, conv.in_channels, 8, 8, requires_grad=input_grad)
        with torch.autograd.graph.saved_tensors_hooks(saved.append, lambda t: t):
            out = conv(x)
        weight_sized = [t for t in saved if t.shape == conv.weight.shape]
        assert all(t.data_ptr() == conv.weight.data_ptr() for t in weight_sized)
        if conv is frozen and not input_grad:
            assert not saved and not out.requires_grad
        else:
            assert weight_sized  # the weight is what the backward folds again
        with torch.no_grad():
            expected = _unfolded(conv, x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _folded_conv(bias: bool, **settings: object) -> torch.nn.Sequential:
    """Conv2d -> FrozenBatchNorm2d in float64, BN statistics not the identity, folded: the
    trainable ConvFrozenBN2d and the identity norm."""
    generator = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(4, 6, 3, bias=bias, **settings).double()
    norm = FrozenBatchNorm2d(6).double()
    norm.weight.copy_(torch.rand(6, generator=generator) + 0.5)
    norm.bias.copy_(torch.randn(6, generator=generator))
    norm.running_mean.copy_(torch.randn(6, generator=generator))
    norm.running_var.copy_(torch.rand(6, generator=generator) + 0.5)
    model = torch.nn.Sequential(conv, norm)
    assert fold_frozen_batch_norm(model) == 1
    assert isinstance(model[0], ConvFrozenBN2d)
    return model


@pytest.mark.parametrize(
    ("bias", "settings"),
    [(False, {}), (True, {"stride": 2, "padding": 1}), (True, {"dilation": 2, "groups": 2})],
)
def test_folded_gradients_pass_gradcheck(bias: bool, settings: dict) -> None:
    """The folded layer's backward (the weight folded again, the convolution's backward, the
    gradients scaled back) against numerical differentiation, for the input, the weight and the
    bias."""
    model = _folded_conv(bias, **settings)
    conv = model[0]
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    params = [conv.weight] + ([conv.bias] if bias else [])

    def function(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(
            model, {name: v for name, v in zip(["0.weight", "0.bias"], values)}, (x,)
        )

    assert torch.autograd.gradcheck(function, (x, *params))


def _unfolded(conv: ConvFrozenBN2d, x: torch.Tensor) -> torch.Tensor:
    """The pair the folded layer stands for: the convolution, then the norm's affine map."""
    scale, shift = conv.norm.scale_and_shift()
    out = conv._conv_forward(x, conv.weight, conv.bias)
    return out * scale[:, None, None] + shift[:, None, None]


def _output_and_grads(
    run: Callable[[torch.Tensor], torch.Tensor], conv: ConvFrozenBN2d, x: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``run(x)`` and the gradients of a weighted sum of it for x, the weight and the bias."""
    conv.zero_grad()
    x = x.detach().requires_grad_(True)
    out = run(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out, x.grad, conv.weight.grad.clone(), conv.bias.grad.clone()


def test_folded_gradients_in_channels_last_equal_the_unfolded_pair() -> None:
    model = _folded_conv(True, padding=1)
    conv = model[0]
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = _output_and_grads(lambda x: _unfolded(conv, x), conv, x)
    ours = _output_and_grads(model, conv, x.contiguous(memory_format=torch.channels_last))
    for value, reference in zip(ours, expected):
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)


def test_folded_trainable_layer_under_compile_and_on_the_meta_device() -> None:
    """torch.compile traces the folded layer's autograd function in training (aot_eager, one
    graph): the unfolded pair's gradients. On the meta device (shape and FLOP counting) the
    layer runs with a gradient wanted."""
    model = _folded_conv(True, padding=1)
    conv = model[0]
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = _output_and_grads(lambda x: _unfolded(conv, x), conv, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for value, reference in zip(_output_and_grads(compiled, conv, x), expected):
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    meta = copy.deepcopy(model).to("meta")
    out = meta(torch.empty(2, 4, 9, 8, device="meta", dtype=torch.float64))
    assert out.shape == (2, 6, 9, 8) and out.requires_grad


def test_folded_model_under_bf16_autocast_and_compile() -> None:
    """The folded layers run under CPU autocast (outputs stay bf16 there, unlike the unfolded
    float32 norm: close, not equal) and under torch.compile (backend="eager": Dynamo traces the
    folded modules)."""
    plain, folded = _pair("resnet18_fpn")
    plain.eval()
    folded.eval()
    images, _ = _batch()
    with torch.no_grad():
        expected = plain.backbone(plain.preprocess(images).tensor)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = folded.backbone(folded.preprocess(images).tensor)
        folded.compile_static_modules(backend="eager")
        compiled = folded.backbone(folded.preprocess(images).tensor)
    for name in expected:
        assert torch.isfinite(mixed[name].float()).all()
        scale = expected[name].abs().max()
        torch.testing.assert_close(mixed[name].float(), expected[name], rtol=0, atol=0.1 * scale)
        torch.testing.assert_close(compiled[name], expected[name], rtol=1e-4, atol=1e-4)
