"""InputReleasingLinear: nn.Linear's results; the input is let go of before its gradient exists."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from frcnn.modeling.roi_heads.box_heads import InputReleasingLinear, MLP2Head


def _pair(bias: bool = True) -> tuple[nn.Linear, InputReleasingLinear]:
    reference = nn.Linear(12, 5, bias=bias).double()
    lean = InputReleasingLinear(12, 5, bias=bias).double()
    lean.load_state_dict(reference.state_dict())
    return reference, lean


def _grads(layer: nn.Module, x: torch.Tensor, backwards: int = 1) -> list[torch.Tensor | None]:
    x = x.detach().clone().requires_grad_(x.requires_grad)
    layer.zero_grad(set_to_none=True)
    out = layer(x * 1.5)
    loss = (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum()
    for index in range(backwards):
        loss.backward(retain_graph=index + 1 < backwards)
    return [out, x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_values_and_gradients_equal_nn_linear(bias: bool, x_grad: bool) -> None:
    reference, lean = _pair(bias)
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=x_grad)
    for ours, theirs in zip(_grads(lean, x), _grads(reference, x), strict=True):
        if theirs is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_frozen_weight_gets_no_gradient() -> None:
    reference, lean = _pair()
    for layer in (reference, lean):
        layer.weight.requires_grad_(False)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    ours, theirs = _grads(lean, x), _grads(reference, x)
    assert lean.weight.grad is None
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lean.bias.grad, reference.bias.grad, rtol=1e-12, atol=1e-12)


def test_retain_graph_keeps_the_input_for_a_second_backward() -> None:
    reference, lean = _pair()
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    ours, theirs = _grads(lean, x, backwards=2), _grads(reference, x, backwards=2)
    for mine, expected in zip(ours, theirs, strict=True):  # gradients accumulated twice
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-12)


class _Packed:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _saved_alive_at_input_grad(layer: nn.Module) -> list[bool]:
    """Whether each tensor the layer saved for backward is still held when the backward's
    matrix product that makes the input's gradient runs."""
    x = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    packed: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> _Packed:
        holder = _Packed(tensor)
        packed.append(weakref.ref(holder))
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
        out = layer(x * 2.0)  # the layer's input exists only in the graph
    alive: list[list[bool]] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            result = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.default and result.shape == x.shape:
                alive.append([ref() is not None for ref in packed])
            return result

    with Watch():
        out.sum().backward()
    assert len(alive) == 1, alive
    return alive[0]


def test_input_is_released_before_its_gradient_is_allocated() -> None:
    reference, lean = _pair()
    assert any(_saved_alive_at_input_grad(reference)), "nn.Linear holds its input there"
    assert not any(_saved_alive_at_input_grad(lean))


def test_autocast_matches_nn_linear_under_autocast() -> None:
    reference, lean = nn.Linear(12, 5), InputReleasingLinear(12, 5)
    lean.load_state_dict(reference.state_dict())
    x = torch.randn(9, 12)
    results = []
    for layer in (lean, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x.clone().requires_grad_())
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        results.append((out, layer.weight.grad, layer.bias.grad))
    for ours, theirs in zip(*results, strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs)


def test_inference_and_nd_inputs_take_nn_linear_path() -> None:
    reference, lean = _pair()
    with torch.no_grad():
        x = torch.randn(3, 12, dtype=torch.float64)
        assert lean(x).grad_fn is None
        torch.testing.assert_close(lean(x), reference(x), rtol=0, atol=0)
    x3 = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    assert type(lean(x3).grad_fn).__name__ == type(reference(x3).grad_fn).__name__


def test_mlp2_head_state_dict_keys_are_nn_linear_keys() -> None:
    head = MLP2Head(12, 8)
    assert isinstance(head.fc6, InputReleasingLinear) and isinstance(head.fc6, nn.Linear)
    assert list(head.state_dict()) == ["fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"]


class _NewStorages(TorchDispatchMode):
    """The sizes (elements) of the tensors made by operators that are not views of their
    input."""

    def __init__(self, pooled: torch.Tensor) -> None:
        super().__init__()
        self.storage = pooled.untyped_storage().data_ptr()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                if tensor.untyped_storage().data_ptr() != self.storage:
                    self.sizes.append(tensor.numel())
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_mlp2_head_takes_channels_last_rows(grad: bool) -> None:
    """Pooled rows laid out channels_last (the sparse RoIAlign kernel's blocks) give the
    contiguous rows' outputs (and gradients) to rounding; without gradients they are never
    copied into Ch-major order: no new tensor is as large as they are."""
    torch.manual_seed(0)
    head = MLP2Head(6 * 3 * 3, 8).double()
    pooled = torch.randn(10, 6, 3, 3, dtype=torch.float64)
    channels_last = pooled.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    results = []
    for rows in (pooled, channels_last):
        head.zero_grad(set_to_none=True)
        rows = rows.clone(memory_format=torch.preserve_format).requires_grad_(grad)
        with torch.set_grad_enabled(grad), _NewStorages(rows) as made:
            out = head(rows)
        if not grad and not rows.is_contiguous():  # the channels_last rows
            assert max(made.sizes) < pooled.numel(), made.sizes
        if grad:
            (out * torch.arange(out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
            results.append((out, rows.grad, head.fc6.weight.grad, head.fc7.weight.grad))
        else:
            results.append((out,))
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
