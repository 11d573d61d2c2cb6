"""The job runner: results in order, the caller's modes in the workers, instrumentation seen."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch

from frcnn.engine.sync_count import count_host_syncs
from frcnn.modeling import parallel

CPU = torch.device("cpu")


def test_image_ranges_are_contiguous_and_balanced() -> None:
    assert parallel.image_ranges(8, 2) == [(0, 4), (4, 8)]
    assert parallel.image_ranges(5, 2) == [(0, 2), (2, 5)]
    assert parallel.image_ranges(1, 4) == [(0, 1)]
    assert parallel.image_ranges(0, 2) == [(0, 0)]
    for images in range(1, 12):
        for chunks in range(1, 6):
            ranges = parallel.image_ranges(images, chunks)
            assert ranges[0][0] == 0 and ranges[-1][1] == images
            assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
            sizes = [end - start for start, end in ranges]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.fixture
def two_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "num_workers", lambda device: 2)


def test_jobs_run_at_once_in_the_caller_and_a_pool_thread_in_order(two_workers: None) -> None:
    both_running = threading.Barrier(2, timeout=30)  # breaks unless two jobs run at once

    def job(index: int) -> tuple[int, str]:
        if index < 2:
            both_running.wait()
        return index, threading.current_thread().name

    names = parallel.run_jobs(job, 6, CPU)
    assert [i for i, _ in names] == list(range(6))
    caller = threading.current_thread().name
    assert {names[0][1], names[1][1]} == {caller, next(n for _, n in names if n != caller)}
    assert all(name == caller or name.startswith("frcnn-jobs") for _, name in names)


def test_an_error_in_a_job_reaches_the_caller_after_the_others_stop(two_workers: None) -> None:
    finished = []

    def job(index: int) -> int:
        if index == 3:
            raise ValueError("job 3")
        time.sleep(0.01)  # long enough that the other thread cannot run through every job
        finished.append(index)
        return index

    with pytest.raises(ValueError, match="job 3"):
        parallel.run_jobs(job, 50, CPU)
    settled = list(finished)
    # jobs 0-2 and what the other thread had already taken; without the stop it would go on
    # through all 49 others
    assert 3 not in settled and len(settled) <= 6, settled
    time.sleep(0.05)
    assert finished == settled  # nothing still running once the error is raised
    assert parallel.run_jobs(lambda i: i, 4, CPU) == [0, 1, 2, 3]  # the pool still works


def test_an_error_in_the_pool_thread_stops_the_caller(two_workers: None) -> None:
    caller, finished = threading.current_thread(), []

    def job(index: int) -> int:
        if threading.current_thread() is not caller:
            raise ValueError(f"job {index} in the pool")
        time.sleep(0.01)
        finished.append(index)
        return index

    with pytest.raises(ValueError, match="in the pool"):
        parallel.run_jobs(job, 50, CPU)
    assert len(finished) <= 3, finished  # without the stop the caller would run 49 jobs


def test_workers_take_the_callers_grad_and_inference_modes(two_workers: None) -> None:
    def modes(_: int) -> tuple[bool, bool]:
        return torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    with torch.no_grad():
        assert parallel.run_jobs(modes, 2, CPU) == [(False, False)] * 2
    both_running = threading.Barrier(2, timeout=30)  # one job in the caller, one in the pool

    def matmul(_: int) -> torch.Tensor:
        both_running.wait()
        return torch.ones(2, 2) @ torch.ones(2, 2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        products = parallel.run_jobs(matmul, 2, CPU)
    assert [p.dtype for p in products] == [torch.bfloat16] * 2
    with torch.inference_mode():
        assert parallel.run_jobs(modes, 2, CPU) == [(False, True)] * 2
    assert parallel.run_jobs(modes, 2, CPU) == [(True, False)] * 2


def test_an_active_mode_sees_the_jobs(two_workers: None) -> None:
    def job(_: int) -> str:
        torch.nonzero(torch.ones(3))
        return threading.current_thread().name

    with count_host_syncs() as syncs:
        names = parallel.run_jobs(job, 4, CPU)
    assert syncs.by_call == {"aten.nonzero": 4}
    assert set(names) == {threading.current_thread().name}


def test_a_job_running_jobs_does_not_wait_for_the_pool(two_workers: None) -> None:
    def outer(index: int) -> list[int]:
        return parallel.run_jobs(lambda inner: 10 * index + inner, 3, CPU)

    assert parallel.run_jobs(outer, 4, CPU) == [[10 * i + j for j in range(3)] for i in range(4)]


def _jobs_in_child() -> None:
    assert parallel.run_jobs(lambda i: i * i, 4, CPU) == [0, 1, 4, 9]


def test_a_forked_child_gets_a_pool_of_its_own(two_workers: None) -> None:
    parallel.run_jobs(lambda i: i, 4, CPU)  # the parent's pool has live threads now
    child = multiprocessing.get_context("fork").Process(target=_jobs_in_child)
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
