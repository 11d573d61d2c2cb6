"""Independent jobs of a batch (RoIAlign over ranges of images, NMS over ranges of images) run in
parallel on a CPU, in the caller's thread and a small pool's, where torchvision's kernels for them
use one core; the kernels release the GIL. On other devices a kernel is parallel already, and the
jobs run one after another."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
_executor: tuple[int, ThreadPoolExecutor] | None = None
_executor_lock = threading.Lock()
_in_worker = threading.local()


def _forget_pool() -> None:
    """In a forked child the pool's threads are gone: start a new pool there when needed. The
    lock is new too: another thread of the parent may have held it at the fork."""
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def num_workers(device: torch.device) -> int:
    """How many jobs run at once on ``device``: torch's intra-op thread count on a CPU, else 1."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def image_ranges(num_images: int, num_chunks: int) -> list[tuple[int, int]]:
    """``num_images`` split into at most ``num_chunks`` contiguous, non-empty, near-equal ranges."""
    num_chunks = max(1, min(num_chunks, num_images))
    bounds = [round(i * num_images / num_chunks) for i in range(num_chunks + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_chunks)]


def run_jobs(work: Callable[[int], T], count: int, device: torch.device) -> list[T]:
    """``[work(0), ..., work(count - 1)]``, on ``num_workers(device)`` threads at once: the
    caller's and ``num_workers - 1`` from a pool, each taking the next job until none is left.

    The caller works too, rather than wait: every extra thread costs a malloc arena of its own
    (memory freed there stays with that thread) and an OpenMP team for the ops it runs."""
    threads = num_workers(device)
    workers = min(threads, count)
    nested = getattr(_in_worker, "active", False)  # a job's own jobs run in its thread
    if workers < 2 or nested or _instrumented():
        return [work(index) for index in range(count)]
    results: list[T | None] = [None] * count
    claim, claim_lock = iter(range(count)), threading.Lock()
    stop = threading.Event()

    def take_jobs() -> None:
        while not stop.is_set():
            with claim_lock:
                index = next(claim, None)
            if index is None:
                return
            try:
                results[index] = work(index)
            except BaseException:
                stop.set()  # the others take no new job
                raise

    # grad, inference and autocast modes are per thread: the helpers take the caller's (grad is
    # off inside an autograd Function; writing into an inference tensor needs inference mode)
    grad_enabled = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def helper() -> None:
        _in_worker.active = True
        with (
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad_enabled),
            torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]),
        ):
            take_jobs()

    helpers = []
    _in_worker.active = True
    try:
        pool = _pool(threads - 1)
        helpers = [pool.submit(helper) for _ in range(workers - 1)]
        take_jobs()
    finally:
        stop.set()  # on success every job is claimed already; else the helpers stop here
        _in_worker.active = False
        errors = [future.exception() for future in helpers]  # waits for every helper
    for error in errors:
        if error is not None:
            raise error
    return results  # type: ignore[return-value]


def _pool(workers: int) -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None or _executor[0] != workers:
            if _executor is not None:
                _executor[1].shutdown(wait=False)
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frcnn-jobs")
            _executor = (workers, pool)
        return _executor[1]


def _instrumented() -> bool:
    """A torch function or dispatch mode (a profiler, a FLOP or host-sync counter, fake tensors)
    is active. Modes are per thread, so the jobs run in the caller's thread, where it sees them
    (the same calls, one after another)."""
    return torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0
