"""Process-group helpers for torchrun; every helper is a no-op in a single process.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads
them. Failure policy: when one rank raises, it exits non-zero at once (nothing here catches
exceptions or waits in a `finally`) and torchrun then terminates the other ranks. The default
group carries a short timeout (`DEFAULT_TIMEOUT_S`) so a rank blocked in a collective whose peer is
gone or hung fails instead of waiting for torch's 10-30 minute default. Work that only rank 0 does
(checkpoint writes, COCO evaluation) can legitimately outlast that timeout, so the other ranks wait
for it on a second, gloo-backed group with a long timeout (`wait_for_main_process`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

# Ranks drift apart by at most one training step (seconds to tens of seconds on a CPU), so three
# minutes only fires when a peer is really gone or hung.
DEFAULT_TIMEOUT_S = 180.0
# Waiting for rank-0-only work: a full COCO evaluation on a slow CPU takes minutes.
LONG_WAIT_TIMEOUT_S = 3600.0

# The long-timeout group is created with the default group and lives exactly as long as it;
# torch.distributed keeps its own default group as module state in the same way.
_long_wait_group: dist.ProcessGroup | None = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; under torchrun a bare ``cuda`` means this rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return resolved


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) and return this rank's device.

    Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and the device is returned.
    """
    global _long_wait_group
    resolved = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or is_distributed():
        return resolved
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch multi-process "
            "training with `torchrun --nproc_per_node=N tools/train.py ...`"
        )
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s)
    )
    _long_wait_group = dist.new_group(
        backend="gloo", timeout=timedelta(seconds=LONG_WAIT_TIMEOUT_S)
    )
    logger.info(
        "Process group ready: rank %d of %d, backend %s, device %s, timeout %.0f s",
        get_rank(),
        world_size,
        backend,
        resolved,
        timeout_s,
    )
    return resolved


def destroy() -> None:
    """Leave the process group; call it after a successful run only (it can block on NCCL)."""
    global _long_wait_group
    if is_distributed():
        dist.destroy_process_group()
    _long_wait_group = None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wait_for_main_process() -> None:
    """Barrier with a long timeout: for the other ranks waiting while rank 0 works alone."""
    if is_distributed():
        dist.barrier(group=_long_wait_group)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; travels on the CPU (gloo) group."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj, group=_long_wait_group)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=_long_wait_group)
    return holder[0]


def all_reduce_max(values: Tensor) -> Tensor:
    """Element-wise maximum over ranks (used to agree on boolean flags); returns a new tensor."""
    reduced = values.clone()
    if is_distributed():
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced


def all_reduce_mean(values: Tensor) -> Tensor:
    """Mean over ranks of a floating tensor; returns a new tensor."""
    reduced = values.clone()
    if is_distributed():
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        reduced /= get_world_size()
    return reduced


def reduce_dict(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Average scalar tensors over ranks (for logging): one collective for the whole dict.

    Every rank must call it with the same keys; the iteration order of the keys is the same on
    every rank because the same code produced the dict.
    """
    if not values:
        return {}
    names = list(values)
    stacked = torch.stack([values[name].detach().float().reshape(()) for name in names])
    averaged = all_reduce_mean(stacked)
    return dict(zip(names, averaged.unbind(0), strict=True))


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun (every parameter must take part in each loss);
    the model itself in a single process."""
    if get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers, whose
    parameter names checkpoints use and whose forward inference calls."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model
