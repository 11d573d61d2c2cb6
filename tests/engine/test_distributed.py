from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_fakes import FakeDetector, FakeStream, make_trainer

from frcnn.engine import distributed

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert not distributed.is_distributed()
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
    assert distributed.is_main_process()
    distributed.barrier()
    distributed.wait_for_main_process()
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x") == "x"
    values = {"loss": torch.tensor(2.5)}
    assert distributed.reduce_dict(values)["loss"].item() == 2.5
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, torch.device("cpu")) is model
    assert distributed.unwrap_model(model) is model


def test_torchrun_env_without_master_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        distributed.init_distributed("cpu")


def _launch(mode: str, output_dir: Path) -> tuple[subprocess.Popen, float]:
    output_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        mode,
        str(output_dir),
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return process, time.monotonic()


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Both torchrun jobs start together (each spends most of its time importing torch)."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = {mode: (*_launch(mode, root / mode), root / mode) for mode in ("train", "crash")}
    yield jobs
    for process, _, _ in jobs.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_ddp_step_equals_single_process_on_combined_batch(launched: dict, tmp_path: Path) -> None:
    process, _, output_dir = launched["train"]
    log, _ = process.communicate(timeout=120)
    assert process.returncode == 0, log[-3000:]
    torch.manual_seed(0)
    single = make_trainer(
        tmp_path, FakeStream(batch_size=2), model=FakeDetector(dropout=0.0), max_iter=1
    )
    single.train()
    rank0 = torch.load(output_dir / "rank0.pt", weights_only=True)
    rank1 = torch.load(output_dir / "rank1.pt", weights_only=True)
    for name, value in single.model.state_dict().items():
        # Per-image losses averaged over the batch: DDP's gradient mean over two ranks of one
        # image each is the same arithmetic as one process on both images, to the bit.
        assert torch.equal(rank0[name], value), name
        assert torch.equal(rank1[name], value), name
    # Iteration 2 was non-finite on rank 1 only, and both ranks skipped it.
    reports = {
        path.name: json.loads(path.read_text())
        for path in (output_dir / "bad_batches").glob("*.json")
    }
    assert set(reports) == {"iter_0000002_rank0.json", "iter_0000002_rank1.json"}
    assert reports["iter_0000002_rank1.json"]["loss_non_finite_on_this_rank"] is True
    assert reports["iter_0000002_rank0.json"]["loss_non_finite_on_this_rank"] is False


@pytest.mark.slow
def test_exception_on_one_rank_ends_the_job(launched: dict) -> None:
    process, started, _ = launched["crash"]
    log, _ = process.communicate(timeout=90)
    elapsed = time.monotonic() - started
    assert process.returncode != 0
    assert "simulated crash while loading iteration 2" in log
    assert elapsed < 60, f"job took {elapsed:.0f} s to end"
