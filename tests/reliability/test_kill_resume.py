"""SIGKILL at random moments, over and over (issue 4, test 2).

tools/train.py writes a checkpoint after every iteration; every other kill waits for one of its
writes to be under way, the others come at a random moment. After every kill the last checkpoint
must load (complete, finite, a whole training state) and never go backwards; resuming from
whatever was left must reach, to the bit, the weights of a run that was never interrupted.
"""

from __future__ import annotations

import random
import signal
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from tooling import run_tool
from train_runs import (
    assert_same_weights,
    final_model,
    log_text,
    start,
    train_args,
    wait_for,
)

from frcnn.engine.checkpoint import Checkpointer, load_checkpoint

MAX_ITER = 60
KILLS = 5
# a wider box head makes 13 MB checkpoints, whose writes take a good part of each iteration
EXTRA = ("solver.checkpoint_period=1", "log_period=10", "model.roi_heads.representation_size=512")


def _writing(output: Path, pid: int) -> bool:
    """Whether process ``pid`` has a checkpoint file half-written (Checkpointer's temporary)."""
    return any((output / "checkpoints").glob(f".*.tmp-{pid}"))


def _check_last_checkpoint(output: Path) -> int:
    """The iteration of the last checkpoint, after checking that it loads as a whole training
    state with finite weights; 0 when no checkpoint was ever completed."""
    last = Checkpointer(output).last()
    if last is None:
        assert "Saved checkpoint" not in log_text(output)
        return 0
    state = load_checkpoint(last)
    assert {"model", "optimizer", "scheduler", "iteration", "rng"} <= state.keys()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert last.name == f"model_{state['iteration']:07d}.pth"
    return int(state["iteration"])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(
    tmp_path: Path, shapes_root: Path
) -> None:
    reference = tmp_path / "reference"
    result = run_tool(train_args(shapes_root, reference, MAX_ITER, *EXTRA))
    assert result.returncode == 0, result.stderr[-3000:]

    output = tmp_path / "killed"
    rng = random.Random(2024)
    reached = [0]
    for attempt in range(1, KILLS + 1):
        args = train_args(shapes_root, output, MAX_ITER, *EXTRA) + ["--resume"]
        process = start(args, tmp_path / "console.txt")
        try:
            wait_for(
                lambda n=attempt: log_text(output).count("Training iterations") >= n,
                timeout=60,
                what=f"run {attempt} to start training",
            )
            if attempt % 2:
                time.sleep(rng.uniform(0.0, 0.5))
            else:  # in the middle of writing a checkpoint (or its pointer)
                writing = partial(_writing, output, process.pid)
                wait_for(writing, 30, "a checkpoint write")
            assert process.poll() is None, "the run ended before it could be killed"
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == -signal.SIGKILL
        reached.append(_check_last_checkpoint(output))
        assert reached[-1] >= reached[-2], reached  # never goes backwards
        assert not (output / "checkpoints" / "model_final.pth").exists()
    assert 0 < reached[-1] < MAX_ITER, reached

    result = run_tool(train_args(shapes_root, output, MAX_ITER, *EXTRA) + ["--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at iteration {reached[-1]}" in log_text(output)
    assert_same_weights(final_model(reference), final_model(output))
