"""SIGTERM during training (issue 4, test 3).

tools/train.py must finish the step under way and no more, write a checkpoint at that iteration,
exit with 143 and a clear message; --resume must then reach, to the bit, the weights of a run
that was never stopped. Images are upscaled to 448 px so a step takes long enough (about 0.2 s)
to tell "after the current step" from "some steps later" through the log.
"""

from __future__ import annotations

import re
import signal
import statistics
import time
from pathlib import Path

import pytest
from tooling import run_tool
from train_runs import (
    assert_same_weights,
    final_model,
    log_text,
    logged_iterations,
    start,
    train_args,
    wait_for,
)

from frcnn.engine.checkpoint import load_checkpoint

MAX_ITER = 10
EXTRA = ("data.min_size=[448]", "data.max_size=448", "log_period=1", "solver.checkpoint_period=100")


def _last_logged(output: Path) -> int:
    return max(logged_iterations(output), default=0)


@pytest.mark.slow
def test_sigterm_stops_after_the_step_and_resume_equals_uninterrupted(
    tmp_path: Path, shapes_root: Path
) -> None:
    reference = tmp_path / "reference"
    result = run_tool(train_args(shapes_root, reference, MAX_ITER, *EXTRA))
    assert result.returncode == 0, result.stderr[-3000:]

    output = tmp_path / "stopped"
    process = start(train_args(shapes_root, output, MAX_ITER, *EXTRA), tmp_path / "console.txt")
    try:
        wait_for(lambda: _last_logged(output) >= 3, 90, "three iterations")
        logged_before = _last_logged(output)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        logged_after = _last_logged(output)
        returncode = process.wait(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        process.kill()
        process.wait()
    assert returncode == 143
    log = log_text(output)
    stopped = int(re.search(rf"Stopped by SIGTERM after iteration (\d+) of {MAX_ITER}", log)[1])
    # the step under way when the signal came is finished, and no other
    assert logged_before <= stopped <= logged_after + 1 < MAX_ITER, (logged_before, stopped)
    step_time = statistics.median(float(t) for t in re.findall(r"time (\S+) s/it", log))
    assert elapsed < step_time + 10.0, (elapsed, step_time)
    assert "continue with --resume" in log
    checkpoints = output / "checkpoints"
    assert (checkpoints / "last_checkpoint").read_text() == f"model_{stopped:07d}.pth"
    assert load_checkpoint(checkpoints / f"model_{stopped:07d}.pth")["iteration"] == stopped
    assert sorted(p.name for p in checkpoints.glob("*.pth")) == [f"model_{stopped:07d}.pth"]

    result = run_tool(train_args(shapes_root, output, MAX_ITER, *EXTRA) + ["--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at iteration {stopped}" in log_text(output)
    assert_same_weights(final_model(reference), final_model(output))
