"""An exception on one rank under torchrun (issue 4, test 8).

tools/train.py on two gloo processes, on a copy of the training set where one image file is gone
and the checker is off: the rank whose share holds that image raises while loading its batch
(the other is then waiting in a collective). The whole job must end with a non-zero status within
a minute, with the error in its output.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tooling import run_tool
from train_runs import train_args

from frcnn.datasets.shapes import ensure_shapes

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.slow
def test_exception_on_one_rank_ends_the_job(tmp_path: Path, shapes_root: Path) -> None:
    layout = ensure_shapes(shapes_root, 12, 4, 96, seed=0)  # what tiny_overrides asks for
    images = tmp_path / "train_images"
    shutil.copytree(layout.coco_images("train"), images)
    (images / "train_000005.jpg").unlink()
    args = train_args(
        shapes_root, tmp_path / "run", 200, f"data.train.images={images}", "data.check=off"
    )
    started = time.monotonic()
    try:
        result = run_tool(args, timeout=90, launcher=TORCHRUN)
    except subprocess.TimeoutExpired:
        raise AssertionError("the job was still running after 90 s") from None
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "image file not found" in result.stdout + result.stderr
    assert "train_000005.jpg" in result.stdout + result.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
