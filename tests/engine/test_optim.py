from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from frcnn.engine.optim import build_lr_scheduler, build_optimizer, build_param_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _group_of(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict:
    (group,) = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    return group


def test_param_groups_decay_and_lr_per_kind() -> None:
    net = Net()
    opt = build_optimizer(
        net,
        "sgd",
        base_lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        bias_lr_factor=2.0,
        weight_decay_bias=1e-5,
    )
    expected = {
        net.conv.weight: (0.1, 1e-4),
        net.fc.weight: (0.1, 1e-4),
        net.conv.bias: (0.2, 1e-5),
        net.fc.bias: (0.2, 1e-5),
        net.bn.weight: (0.1, 0.0),
        net.gn.weight: (0.1, 0.0),
        net.bn.bias: (0.2, 0.0),
        net.gn.bias: (0.2, 0.0),
    }
    for param, (lr, wd) in expected.items():
        group = _group_of(opt, param)
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == wd
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in expected}  # frozen parameters left out
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_no_decay_on_biases_when_weight_decay_bias_is_zero() -> None:
    groups = build_param_groups(Net(), base_lr=0.01, weight_decay=1e-4)
    decayed = [n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]]
    assert sorted(decayed) == ["conv.weight", "fc.weight"]


def test_adamw_and_unknown_name() -> None:
    opt = build_optimizer(Net(), "adamw", base_lr=1e-3, momentum=0.9, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="'adam'"):
        build_optimizer(Net(), "adam", base_lr=1e-3)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), "sgd", base_lr=1e-3)


def _lrs(scheduler_args: dict, iterations: int) -> list[float]:
    """lr used at iterations 0 .. iterations-1, stepping once per iteration."""
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = build_lr_scheduler(opt, **scheduler_args)
    lrs = []
    for _ in range(iterations):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_warmup_then_step_decay_by_hand() -> None:
    lrs = _lrs(
        dict(
            schedule="step",
            max_iter=40,
            steps=[20, 30],
            gamma=0.1,
            warmup_iters=10,
            warmup_factor=0.001,
        ),
        40,
    )
    # warm-up start, middle (0.001 * 0.5 + 0.5), end; before / at each step boundary
    assert lrs[0] == pytest.approx(0.1 * 0.001)
    assert lrs[5] == pytest.approx(0.1 * 0.5005)
    assert lrs[9] == pytest.approx(0.1 * (0.001 * 0.1 + 0.9))
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[19] == pytest.approx(0.1)
    assert lrs[20] == pytest.approx(0.01)
    assert lrs[29] == pytest.approx(0.01)
    assert lrs[30] == pytest.approx(0.001)
    assert lrs[40] == pytest.approx(0.001)


def test_cosine_reaches_zero_at_max_iter() -> None:
    lrs = _lrs(dict(schedule="cosine", max_iter=100, warmup_iters=0), 100)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[25] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs[50] == pytest.approx(0.05)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_warmup_multiplies() -> None:
    lrs = _lrs(dict(schedule="cosine", max_iter=100, warmup_iters=10, warmup_factor=0.5), 10)
    assert lrs[0] == pytest.approx(0.1 * 0.5)
    assert lrs[4] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.04)) * (0.5 * 0.6 + 0.4))


def test_scheduler_state_round_trip_weights_only() -> None:
    def build() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, build_lr_scheduler(opt, "step", 40, [20], 0.1, 10, 0.001)

    opt, sched = build()
    for _ in range(25):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    opt2, sched2 = build()
    sched2.load_state_dict(torch.load(buffer, weights_only=True))
    sched2.step()
    sched.step()
    assert sched2.last_epoch == 26
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01)


def test_bad_schedule_arguments() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="beyond solver.max_iter"):
        build_lr_scheduler(opt, "step", 100, steps=[50, 200])
    with pytest.raises(ValueError, match="unknown schedule"):
        build_lr_scheduler(opt, "poly", 100)
