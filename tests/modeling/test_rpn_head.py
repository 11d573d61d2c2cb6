"""The RPN head's two 1x1 convolutions run as one: the same outputs and gradients as the two
layers applied apart, one convolution backward per layer and level, torchvision's names."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from frcnn.modeling.rpn import RPNHead


class _CountOps(TorchDispatchMode):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.count = name, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += str(func) == self.name
        return func(*args, **(kwargs or {}))


def _levels(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(2, 8, size, size + 1, dtype=dtype, generator=generator, requires_grad=True)
        for size in (6, 3)
    ]


@pytest.mark.parametrize("objectness", ["softmax", "sigmoid"])
def test_fused_outputs_and_gradients_equal_the_two_layers(objectness: str) -> None:
    torch.manual_seed(0)
    head = RPNHead(8, 3, objectness).double()
    for layer in (head.cls_logits, head.bbox_pred):
        torch.nn.init.normal_(layer.bias)
    features = _levels()
    logits, deltas = head(features)
    references = [f.detach().clone().requires_grad_(True) for f in features]
    for level, feature in enumerate(references):
        hidden = torch.relu(head.conv(feature))
        expected_logits, expected_deltas = head.cls_logits(hidden), head.bbox_pred(hidden)
        assert logits[level].shape == (2, 6 if objectness == "softmax" else 3, *feature.shape[2:])
        assert deltas[level].shape == (2, 12, *feature.shape[2:])
        torch.testing.assert_close(logits[level], expected_logits, rtol=0, atol=1e-12)
        torch.testing.assert_close(deltas[level], expected_deltas, rtol=0, atol=1e-12)
        (expected_logits.sum() + (expected_deltas**2).sum()).backward()
    wanted = {name: p.grad.clone() for name, p in head.named_parameters()}
    head.zero_grad()
    sum(x.sum() for x in logits).add(sum((x**2).sum() for x in deltas)).backward()
    for name, parameter in head.named_parameters():
        torch.testing.assert_close(parameter.grad, wanted[name], rtol=0, atol=1e-10, msg=name)
    for feature, reference in zip(features, references):
        torch.testing.assert_close(feature.grad, reference.grad, rtol=0, atol=1e-10)
    layers, kinds = ("conv", "cls_logits", "bbox_pred"), ("weight", "bias")
    names = {name for name, _ in head.named_parameters()}
    assert names == {f"{layer}.{kind}" for layer in layers for kind in kinds}


def test_each_level_runs_two_convolution_backwards_not_three() -> None:
    """The 3x3 convolution's and the fused 1x1's: the hidden map's gradient is made once."""
    head = RPNHead(8, 3, "sigmoid").double()
    logits, deltas = head(_levels())
    loss = sum(x.sum() for x in logits) + sum(x.sum() for x in deltas)
    counter = _CountOps("aten.convolution_backward.default")
    with counter:
        loss.backward()
    assert counter.count == 2 * 2  # two levels
