"""Optimizer with per-parameter-kind groups and the iteration-based learning-rate schedule.

Linear scaling rule (Goyal et al., "Accurate, Large Minibatch SGD"): ``base_lr`` belongs to a
given ``ims_per_batch`` (the total over all processes). When the batch changes by a factor k,
multiply ``base_lr`` by k, and divide ``max_iter``, ``steps``, ``warmup_iters``, the checkpoint
and evaluation periods by k, so that the run sees the same number of images at the same learning
rate per image. Example: detectron2's 1x schedule is 0.02 at 16 images for 90k iterations; on 2
images it becomes 0.0025 for 720k iterations. The rule holds well for SGD up to a few thousand
images per batch; AdamW is less sensitive and usually keeps its base_lr for small batch changes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Parameters of these modules get no weight decay: decaying a norm layer's scale and shift only
# fights the normalisation (detectron2 and timm do the same).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _is_norm(module: nn.Module) -> bool:
    # Class-name match catches norm layers defined elsewhere (FrozenBatchNorm2d, LayerNorm2d, ...).
    return isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__


def _group_key(
    module: nn.Module,
    param_name: str,
    base_lr: float,
    weight_decay: float,
    bias_lr_factor: float,
    weight_decay_bias: float,
) -> tuple[float, float]:
    is_bias = param_name == "bias"
    lr = base_lr * bias_lr_factor if is_bias else base_lr
    if _is_norm(module):
        return lr, 0.0
    return lr, weight_decay_bias if is_bias else weight_decay


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: float = 0.0,
) -> list[dict]:
    """Trainable parameters grouped by (lr, weight_decay), in model order.

    Norm-layer parameters: no weight decay. Biases: ``lr = base_lr * bias_lr_factor`` and
    ``weight_decay_bias``. Everything else: ``base_lr`` and ``weight_decay``. Each group carries
    ``param_names`` so a mismatched optimizer checkpoint can be diagnosed.
    """
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            key = _group_key(
                module, param_name, base_lr, weight_decay, bias_lr_factor, weight_decay_bias
            )
            group = groups.setdefault(
                key, {"params": [], "param_names": [], "lr": key[0], "weight_decay": key[1]}
            )
            group["params"].append(param)
            group["param_names"].append(f"{module_name}.{param_name}".lstrip("."))
    if not groups:
        raise ValueError(
            "build_optimizer: the model has no parameter with requires_grad=True; "
            "check model.backbone.trainable_layers and any freezing in the model"
        )
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    name: str,
    base_lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: float = 0.0,
) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or AdamW (``betas=(momentum, 0.999)``) over `build_param_groups`.

    ``base_lr`` is the learning rate for the configured ``ims_per_batch``; see the module
    docstring for how to scale it with the batch.
    """
    groups = build_param_groups(model, base_lr, weight_decay, bias_lr_factor, weight_decay_bias)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(
            groups, lr=base_lr, betas=(momentum, 0.999), weight_decay=weight_decay
        )
    raise ValueError(f"solver.optimizer: unknown optimizer {name!r}; use 'sgd' or 'adamw'")


def warmup_factor_at(iteration: int, warmup_iters: int, warmup_factor: float) -> float:
    """Linear ramp from ``warmup_factor`` at iteration 0 to 1 at ``warmup_iters``."""
    if iteration >= warmup_iters:
        return 1.0
    alpha = iteration / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


def lr_multiplier(
    schedule: str,
    max_iter: int,
    steps: Sequence[int],
    gamma: float,
    warmup_iters: int,
    warmup_factor: float,
) -> Callable[[int], float]:
    """The factor applied to every group's base lr at a given iteration (0-based).

    ``step``: ``gamma ** (number of steps <= iteration)``; ``cosine``: ``0.5 * (1 + cos(pi *
    iteration / max_iter))``, reaching 0 at ``max_iter``. Both times the warm-up factor.
    """
    if schedule not in ("step", "cosine"):
        raise ValueError(f"solver.lr_schedule: unknown schedule {schedule!r}; use step or cosine")
    sorted_steps = sorted(steps)
    if any(step > max_iter for step in sorted_steps):
        raise ValueError(
            f"solver.steps {list(steps)} contains steps beyond solver.max_iter={max_iter}; "
            "they would never apply. Scale them with max_iter."
        )

    def multiplier(iteration: int) -> float:
        if schedule == "step":
            decay = gamma ** bisect.bisect_right(sorted_steps, iteration)
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * min(iteration, max_iter) / max_iter))
        return decay * warmup_factor_at(iteration, warmup_iters, warmup_factor)

    return multiplier


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    max_iter: int,
    steps: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
) -> LambdaLR:
    """Iteration-based LambdaLR: call ``step()`` once per iteration, so iteration i runs at
    ``base_lr * multiplier(i)``.

    The multiplier is a plain function, so ``state_dict()`` holds only the position
    (``last_epoch``) and base lrs; on resume the schedule's shape comes from the arguments.
    """
    if max_iter <= 0:
        raise ValueError(f"solver.max_iter must be positive, got {max_iter}")
    multiplier = lr_multiplier(schedule, max_iter, steps, gamma, warmup_iters, warmup_factor)
    return LambdaLR(optimizer, lr_lambda=multiplier)
