"""Training monitor: smoothed losses, TensorBoard scalars and images, tqdm bar, log lines.

Per-step values stay on the device in a window of the last `WINDOW` steps; they are averaged
over ranks and read on the host only at the logging interval, so recording a step never
synchronises with the device. Everything visible (TensorBoard, bar, console) happens on rank 0.
"""

from __future__ import annotations

import datetime
import logging
import math
import resource
import statistics
import sys
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from frcnn.engine.distributed import all_reduce_mean

logger = logging.getLogger(__name__)

WINDOW = 20


def memory_tag_and_mb(device: torch.device) -> tuple[str, float]:
    """Peak memory: CUDA's max allocated on a GPU, the process's max resident set on a CPU."""
    if device.type == "cuda":
        return "memory/cuda_max_allocated_mb", torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return "memory/max_rss_mb", peak / (2**20 if sys.platform == "darwin" else 2**10)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metric dicts to ``a/b/c`` tags, keeping the numeric leaves."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[tag] = float(value)
        elif isinstance(value, Tensor) and value.numel() == 1:
            flat[tag] = float(value)
    return flat


class TrainingMonitor:
    """Collects per-step scalars; `log` must be called by every rank at the same iterations."""

    def __init__(
        self,
        output_dir: str | Path,
        device: torch.device,
        start_iter: int,
        max_iter: int,
        enabled: bool,
    ) -> None:
        self.device = device
        self.max_iter = max_iter
        self.enabled = enabled
        self._names: list[str] | None = None
        self._values: deque[Tensor] = deque(maxlen=WINDOW)
        self._iter_times: deque[float] = deque(maxlen=WINDOW)
        self._data_times: deque[float] = deque(maxlen=WINDOW)
        self.writer = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir), flush_secs=30)
            self.bar = tqdm(
                total=max_iter, initial=start_iter, desc="train", dynamic_ncols=True, leave=True
            )

    def record(self, values: Mapping[str, Tensor], iter_time: float, data_time: float) -> None:
        """Keep one step's scalars (0-d tensors, left on the device)."""
        names = list(values)
        if self._names is None:
            self._names = names
        elif names != self._names:
            raise ValueError(f"the model's losses changed from {self._names} to {names}")
        self._values.append(torch.stack([values[n].detach().float() for n in names]))
        self._iter_times.append(iter_time)
        self._data_times.append(data_time)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _smoothed(self) -> dict[str, float]:
        if not self._values or self._names is None:
            return {}
        # (W, L): averaged over ranks, then one host transfer for the whole window.
        window = all_reduce_mean(torch.stack(list(self._values))).cpu()
        medians = window.median(dim=0).values.tolist()
        return dict(zip(self._names, medians, strict=True))

    def log(self, iteration: int, lr: float) -> dict[str, float]:
        """Write the smoothed scalars at ``iteration`` (steps done); returns them."""
        scalars = self._smoothed()
        if self._iter_times:
            scalars["time/iter"] = statistics.median(self._iter_times)
            scalars["time/data"] = statistics.median(self._data_times)
        scalars["lr"] = lr
        tag, megabytes = memory_tag_and_mb(self.device)
        scalars[tag] = megabytes
        if self.enabled:
            self._write(iteration, scalars)
        return scalars

    def _write(self, iteration: int, scalars: dict[str, float]) -> None:
        assert self.writer is not None and self.bar is not None
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, iteration)
        losses = {k: v for k, v in scalars.items() if "loss" in k}
        if "total_loss" in scalars:
            self.bar.set_postfix(loss=f"{scalars['total_loss']:.4f}", lr=f"{scalars['lr']:.3g}")
        eta = scalars.get("time/iter", math.nan) * (self.max_iter - iteration)
        eta_text = str(datetime.timedelta(seconds=int(eta))) if math.isfinite(eta) else "?"
        memory = " ".join(
            f"{k.removeprefix('memory/')} {v:.0f}" for k, v in scalars.items() if "memory/" in k
        )
        logger.info(
            "iter %d/%d  %s  lr %.4g  time %.3f s/it  data %.3f s  eta %s  %s",
            iteration,
            self.max_iter,
            "  ".join(f"{k} {v:.4f}" for k, v in losses.items()),
            scalars["lr"],
            scalars.get("time/iter", math.nan),
            scalars.get("time/data", math.nan),
            eta_text,
            memory,
        )

    def write_metrics(self, metrics: Mapping[str, Any], iteration: int) -> None:
        """Evaluation results, e.g. ``{"bbox": {"AP": 37.2, ...}}`` as ``bbox/AP`` scalars."""
        if self.writer is None:
            return
        for tag, value in flatten_metrics(metrics).items():
            self.writer.add_scalar(tag, value, iteration)
        self.writer.flush()

    def add_image(self, tag: str, image: Tensor, iteration: int) -> None:
        """A (3, H, W) uint8 or [0, 1] float image, e.g. from `draw_detection_panels`."""
        if self.writer is not None:
            self.writer.add_image(tag, image, iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
