"""Independent jobs of a batch (RoIAlign over ranges of images, NMS over ranges of images) run on
a thread pool on a CPU, where torchvision's kernels for them use one core; the kernels release the
GIL. On other devices a kernel is parallel already, and the jobs run one after another."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
_executor: tuple[int, ThreadPoolExecutor] | None = None


def num_workers(device: torch.device) -> int:
    """How many jobs run at once on ``device``: torch's intra-op thread count on a CPU, else 1."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def image_ranges(num_images: int, num_chunks: int) -> list[tuple[int, int]]:
    """``num_images`` split into at most ``num_chunks`` contiguous, non-empty, near-equal ranges."""
    num_chunks = max(1, min(num_chunks, num_images))
    bounds = [round(i * num_images / num_chunks) for i in range(num_chunks + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_chunks)]


def run_jobs(work: Callable[[int], T], count: int, device: torch.device) -> list[T]:
    """``[work(0), ..., work(count - 1)]``, on ``num_workers(device)`` threads at once."""
    workers = num_workers(device)
    if workers < 2 or count < 2 or _instrumented():
        return [work(index) for index in range(count)]
    global _executor
    if _executor is None or _executor[0] != workers:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frcnn-jobs")
        _executor = (workers, pool)
    # grad and inference modes are per thread: the workers take the caller's (grad is off inside
    # an autograd Function; writing into an inference tensor needs inference mode)
    grad_enabled = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()

    def in_caller_modes(index: int) -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
            return work(index)

    return list(_executor[1].map(in_caller_modes, range(count)))


def _instrumented() -> bool:
    """A torch function or dispatch mode (a profiler, a FLOP or host-sync counter, fake tensors)
    is active. Modes are per thread, so the jobs run in the caller's thread, where it sees them
    (the same calls, one after another)."""
    return torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0
