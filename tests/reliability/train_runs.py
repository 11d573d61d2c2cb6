"""tools/train.py runs that a test interrupts: started in the background, watched through log.txt.

Uses the environment of tests/integration/tooling.py (single-threaded, no GPU) so an interrupted
run and an uninterrupted one compute the same numbers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tooling import ROOT, tiny_overrides

QUICKSTART = "configs/quickstart.yaml"


def train_args(shapes_root: Path, output: Path, max_iter: int, *extra: str) -> list[str]:
    """tools/train.py on the tiny quick-start config; ``extra`` overrides come last."""
    opts = [*tiny_overrides(shapes_root, output, max_iter=max_iter), *extra]
    return ["tools/train.py", "--config", QUICKSTART, "--opts", *opts]


def start(args: list[str], console: Path) -> subprocess.Popen:
    """Run a tool in the background, its console going to ``console`` (a pipe could fill up)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with open(console, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def log_text(output: Path) -> str:
    path = output / "log.txt"
    return path.read_text(errors="replace") if path.is_file() else ""


def logged_iterations(output: Path) -> list[int]:
    """Iterations of the monitor's log lines (``iter K/N``), in order."""
    return [int(k) for k in re.findall(r"\biter (\d+)/\d+", log_text(output))]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.01)


def final_model(output: Path) -> dict[str, torch.Tensor]:
    path = output / "checkpoints" / "model_final.pth"
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key
