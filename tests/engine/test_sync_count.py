"""The host-sync counter counts each kind of call the issue names, once, and nothing else."""

from __future__ import annotations

import torch
import torchvision

from frcnn.engine.sync_count import count_host_syncs


def _boxes(count: int) -> torch.Tensor:
    corner = torch.rand(count, 2) * 50
    return torch.cat([corner, corner + 10 + torch.rand(count, 2) * 20], dim=1)


def test_each_synchronising_call_counts_once() -> None:
    x = torch.rand(10)
    mask = x > 0.5
    cases = {
        "Tensor.item": lambda: x[0].item(),
        "Tensor.tolist": lambda: x.tolist(),
        "Tensor.cpu": lambda: x.cpu(),
        "Tensor.numpy": lambda: x.numpy(),
        "Tensor.__bool__": lambda: bool(x.sum() > 0),
        "Tensor.__int__": lambda: int(x.argmax()),
        "Tensor.__float__": lambda: float(x.sum()),
        "aten.nonzero": lambda: torch.where(mask),
        "boolean-mask indexing": lambda: x[mask],
        "boolean-mask assignment": lambda: x.clone().__setitem__(mask, 0.0),
        "aten.masked_select": lambda: torch.masked_select(x, mask),
        "aten._unique2": lambda: torch.unique(x),
        "aten.repeat_interleave.Tensor": lambda: torch.repeat_interleave(torch.tensor([1, 2])),
        "torchvision.nms": lambda: torchvision.ops.nms(_boxes(20), torch.rand(20), 0.5),
        "aten.equal": lambda: torch.equal(x, x),
    }
    for name, call in cases.items():
        with count_host_syncs() as syncs:
            call()
        assert dict(syncs.by_call) == {name: 1}, (name, syncs)


def test_device_side_work_counts_nothing() -> None:
    x = torch.rand(6, 5)
    mask = x > 0.5
    with count_host_syncs() as syncs:
        x.masked_fill(mask, 0.0)
        torch.where(mask, x, torch.zeros_like(x))
        x.topk(2, dim=1)
        x.sort(dim=1)
        x.index_select(0, torch.tensor([0, 2]))
        x[torch.tensor([1, 3])]
        x[:, 1:3] * 2
        torch.repeat_interleave(x, torch.tensor([1, 2, 1, 1, 1, 1]), dim=0, output_size=7)
        torchvision.ops.box_iou(_boxes(3), _boxes(4))
        x.shape[0] + x.numel()
    assert syncs.total == 0, syncs


def test_counts_add_up_inside_a_function() -> None:
    def step(x: torch.Tensor) -> float:
        keep = torch.nonzero(x > 0.2).squeeze(1)
        return x[keep].sum().item()

    with count_host_syncs() as syncs:
        for _ in range(3):
            step(torch.rand(8))
    assert syncs.total == 6
    assert syncs.by_call == {"aten.nonzero": 3, "Tensor.item": 3}
