"""Helpers for end-to-end runs of the tools on a tiny generated dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tiny_overrides(shapes_root: Path, output_dir: Path, max_iter: int = 6) -> list[str]:
    """The quick-start config shrunk to seconds: 96 px images, batch 2, a few iterations."""
    coco = shapes_root / "coco"
    return [
        f"output_dir={output_dir}",
        f"data.shapes.root={shapes_root}",
        "data.shapes.num_train=12",
        "data.shapes.num_val=4",
        "data.shapes.image_size=96",
        f"data.train.images={coco / 'train'}",
        f"data.train.annotations={coco / 'annotations' / 'train.json'}",
        f"data.test.images={coco / 'val'}",
        f"data.test.annotations={coco / 'annotations' / 'val.json'}",
        "data.min_size=[96]",
        "data.max_size=96",
        "data.test_min_size=96",
        "data.test_max_size=96",
        "data.num_workers=0",
        "model.backbone.channels=32",
        "model.roi_heads.representation_size=64",
        "model.roi_heads.batch_size_per_image=32",
        "solver.ims_per_batch=2",
        f"solver.max_iter={max_iter}",
        f"solver.steps=[{max(1, max_iter - 2)}]",
        "solver.warmup_iters=2",
        "solver.checkpoint_period=3",
        "log_period=2",
    ]


def run_tool(args: list[str], timeout: float = 300, launcher: list[str] | None = None):
    """Run a tool as a user would, from the repository root, single-threaded (two processes on a
    two-core machine) and without a GPU; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = (launcher or [sys.executable]) + args
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
