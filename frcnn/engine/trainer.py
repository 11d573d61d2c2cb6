"""Iteration-based training loop: AMP, DDP, non-finite guard, checkpoints, resume, graceful stop.

One iteration: fetch a batch, forward under autocast, backward, optional gradient clipping,
then a single host synchronisation that decides whether the step is finite (and, under DDP,
whether any rank asked to stop), then the optimizer and scheduler steps.

The finite check costs one device-to-host read per step; it is kept because a non-finite step
has to be skipped *before* it reaches the weights and the momentum, and there is no way to make
``optimizer.step()`` conditional on a device value without reading it (GradScaler reads its
inf flag the same way). It is taken after backward, so a single read covers the loss and (when
no GradScaler is active) the gradient norm, and under DDP the same small all_reduce carries the
stop request. With fp16 the GradScaler still handles gradient overflow on its own: those steps
are the normal loss-scale search, not bad steps. Loss values are otherwise read only every
``log_period`` iterations.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from frcnn.engine.amp import autocast, make_grad_scaler
from frcnn.engine.checkpoint import (
    Checkpointer,
    check_plain_state,
    load_checkpoint,
    load_model_weights,
)
from frcnn.engine.distributed import (
    all_gather_object,
    all_reduce_max,
    broadcast_object,
    get_rank,
    get_world_size,
    is_main_process,
    unwrap_model,
    wait_for_main_process,
)
from frcnn.engine.logger import setup_logging
from frcnn.engine.monitor import TrainingMonitor
from frcnn.engine.seed import get_rng_state, set_rng_state

logger = logging.getLogger(__name__)

# Called with the (possibly DDP-wrapped) model; returns e.g. {"bbox": {...}, "voc": {...}}.
EvaluateFn = Callable[[nn.Module], Mapping[str, Any]]
# Called on rank 0 only, with the (possibly DDP-wrapped) model: run the plain module
# (distributed.unwrap_model) and return a (3, H, W) image for TensorBoard, or None.
VisualizeFn = Callable[[nn.Module], Tensor | None]


@dataclass
class TrainOutcome:
    """``completed`` is False when a signal stopped the run early at ``iteration``."""

    iteration: int
    completed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    stop_signal: str | None = None


@dataclass
class _Step:
    losses: dict[str, Tensor]
    total: Tensor
    grad_norm: Tensor | None
    bad: bool  # agreed by every rank: the step was skipped
    loss_non_finite: bool  # this rank's own loss was non-finite
    stop: bool  # some rank received SIGTERM / SIGINT


class StopRequest:
    """While active, SIGTERM and SIGINT only record that a stop was asked for.

    The loop finishes the current iteration, saves a checkpoint and returns. Handlers are
    installed from the main thread only (Python's rule) and restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _running_stats(model: nn.Module) -> list[Tensor]:
    """The buffers a training forward updates: batch-norm running statistics and counters."""
    stats = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            stats += [module.running_mean, module.running_var, module.num_batches_tracked]
    return [buffer for buffer in stats if buffer is not None]


def _json_float(value: float) -> float | str:
    # Strict JSON has no NaN / Infinity.
    return value if math.isfinite(value) else str(value)


def _write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)


def describe_batch(batch: Any) -> list[dict[str, Any]]:
    """Per image: ids, file, sizes, ground-truth boxes and labels (for bad-batch reports)."""
    records = []
    for info, target in zip(batch.infos, batch.targets, strict=True):
        boxes = target.boxes.detach().float().cpu().tolist()
        records.append(
            {
                "image_id": int(info.image_id),
                "file_name": str(info.file_name),
                "original_size": list(info.original_size),
                "image_size": list(info.image_size),
                "boxes": [[_json_float(v) for v in box] for box in boxes],
                "labels": target.labels.cpu().tolist(),
            }
        )
    return records


class Trainer:
    """Runs ``max_iter`` iterations of ``model`` on the batches of ``train_loader(start_iter)``.

    ``train_loader`` builds the (infinite) batch stream starting at a given iteration, so a
    resumed run sees the batches an uninterrupted one would. Transforms and samplers must draw
    from their own generators, seeded by iteration, not from the global RNG: the global RNG
    states are checkpointed for the model's own sampling. ``config`` is the resolved
    configuration as a plain dict, stored in every checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: Callable[[int], Iterable[Any]],
        *,
        device: torch.device,
        output_dir: str | os.PathLike,
        max_iter: int,
        amp: str = "off",
        clip_grad_norm: float = 0.0,
        checkpoint_period: int = 0,
        eval_period: int = 0,
        evaluate_fn: EvaluateFn | None = None,
        visualize_fn: VisualizeFn | None = None,
        log_period: int = 20,
        max_bad_steps: int = 5,
        config: Mapping[str, Any] | None = None,
        keep_checkpoints: int = 2,
    ) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"solver.max_bad_steps must be >= 1, got {max_bad_steps}")
        if log_period < 1:
            raise ValueError(f"log_period must be >= 1, got {log_period}")
        self.config = dict(config or {})
        check_plain_state(self.config, "config")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.device = device
        self.output_dir = Path(output_dir)
        self.max_iter = max_iter
        self.amp = amp
        self.clip_grad_norm = clip_grad_norm
        self.checkpoint_period = checkpoint_period
        self.eval_period = eval_period
        self.evaluate_fn = evaluate_fn
        self.visualize_fn = visualize_fn
        self.log_period = log_period
        self.max_bad_steps = max_bad_steps
        self.scaler = make_grad_scaler(device, amp)
        self.checkpointer = Checkpointer(self.output_dir, keep=keep_checkpoints)
        self.start_iter = 0
        self._pending_rng: dict[str, Any] | None = None
        self._bad_streak = 0
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._norm_stats = _running_stats(model)
        # The lr worth logging is that of the group holding most parameters.
        sizes = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]
        self._lr_group = sizes.index(max(sizes))
        setup_logging(self.output_dir, get_rank())

    # ----------------------------------------------------------------------------- resume

    def resume_or_load(self, resume: bool = True) -> int:
        """With ``resume``, restore everything from the last good checkpoint in output_dir (if
        any) and return the iteration to continue from; otherwise start at 0."""
        path = self.checkpointer.last() if resume and is_main_process() else None
        path = broadcast_object(None if path is None else str(path))
        if path is None:
            logger.info(
                "No checkpoint to resume from in %s: starting at iteration 0",
                self.checkpointer.directory,
            )
            self.start_iter = 0
            return 0
        self.load_state(load_checkpoint(path), path)
        logger.info("Resumed from %s at iteration %d", path, self.start_iter)
        return self.start_iter

    def load_state(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        load_model_weights(unwrap_model(self.model), state["model"], False, source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"optimizer state in {source} does not fit this optimizer ({error}). The "
                "trainable parameters or their grouping changed (trainable_layers, "
                "bias_lr_factor, weight_decay_bias, optimizer). Start a new output_dir and "
                "initialise from the checkpoint with model.weights instead of resuming."
            ) from error
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.start_iter = int(state["iteration"])
        rng_states = state.get("rng", [])
        if len(rng_states) == get_world_size():
            self._pending_rng = rng_states[get_rank()]
        else:
            logger.warning(
                "%s was written by %d processes, this run has %d: random states not restored",
                source,
                len(rng_states),
                get_world_size(),
            )

    def checkpoint_state(self, iteration: int, rng_states: list[dict[str, Any]]) -> dict:
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "iteration": iteration,
            "rng": rng_states,
            "world_size": get_world_size(),
            "config": self.config,
        }

    def save_checkpoint(self, name: str, iteration: int) -> Path:
        """Collective: every rank sends its RNG state, rank 0 writes."""
        rng_states = all_gather_object(get_rng_state())
        path = self.checkpointer.directory / f"{name}.pth"
        if is_main_process():
            path = self.checkpointer.save(name, self.checkpoint_state(iteration, rng_states))
        wait_for_main_process()
        return path

    # ------------------------------------------------------------------------------- step

    def _grad_norm(self) -> Tensor | None:
        if self.clip_grad_norm > 0:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            return torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
        if self.scaler.is_enabled():
            return None
        return torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None])

    def run_step(self, batch: Any, stop_requested: bool) -> _Step:
        batch = batch.to(self.device)
        # A skipped step must not leave its trace in batch-norm statistics either: keep a
        # device-side copy to put back (a few KB, no host synchronisation).
        saved_stats = [buffer.clone() for buffer in self._norm_stats]
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            loss_dict = self.model(batch.images, batch.targets)
        losses = {name: loss.float() for name, loss in loss_dict.items()}
        total = torch.stack(list(losses.values())).sum()
        self.scaler.scale(total).backward()
        grad_norm = self._grad_norm()
        loss_bad = ~torch.isfinite(total)
        bad = loss_bad
        if grad_norm is not None and not self.scaler.is_enabled():
            bad = loss_bad | ~torch.isfinite(grad_norm)
        local = torch.stack([loss_bad, bad, torch.tensor(stop_requested, device=bad.device)])
        local = local.int()
        # The one host synchronisation of the step (see the module docstring).
        flags = torch.cat([local, all_reduce_max(local[1:])]).tolist()
        local_loss_bad, _, _, agreed_bad, agreed_stop = flags
        if agreed_bad:
            self.optimizer.zero_grad(set_to_none=True)
            for buffer, saved in zip(self._norm_stats, saved_stats):
                buffer.copy_(saved)
            if self.scaler.is_enabled() and self.clip_grad_norm > 0:
                self.scaler.update()  # unscale_ ran; update() closes the scaler's step
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        return _Step(
            losses, total, grad_norm, bool(agreed_bad), bool(local_loss_bad), bool(agreed_stop)
        )

    def _write_bad_batch(self, iteration: int, batch: Any, step: _Step) -> Path:
        """``bad_batches/iter_XXXXXXX.json`` (``_rank<r>`` under DDP: every rank skipped the
        step and writes its own share of the batch)."""
        suffix = "" if get_world_size() == 1 else f"_rank{get_rank()}"
        report = self.output_dir / "bad_batches" / f"iter_{iteration:07d}{suffix}.json"
        grad_norm = None if step.grad_norm is None else _json_float(float(step.grad_norm))
        payload = {
            "iteration": iteration,
            "rank": get_rank(),
            "loss_non_finite_on_this_rank": step.loss_non_finite,
            "losses": {k: _json_float(float(v.detach())) for k, v in step.losses.items()},
            "total_loss": _json_float(float(step.total.detach())),
            "grad_norm": grad_norm,
            "images": describe_batch(batch),
        }
        _write_json_atomic(report, payload)
        return report

    def _handle_bad_step(self, iteration: int, batch: Any, step: _Step) -> None:
        self._bad_streak += 1
        report = self._write_bad_batch(iteration, batch, step)
        logger.warning(
            "Iteration %d: non-finite loss or gradients, step skipped (%d in a row); batch "
            "written to %s",
            iteration,
            self._bad_streak,
            report,
        )
        if self._bad_streak >= self.max_bad_steps:
            raise FloatingPointError(
                f"{self._bad_streak} consecutive non-finite training steps (up to iteration "
                f"{iteration}); the batches are described in {report.parent}. Check those "
                "annotations, lower solver.base_lr, lengthen solver.warmup_iters or set "
                "solver.clip_grad_norm."
            )

    # ------------------------------------------------------------------------------- loop

    def _start(self) -> Iterator[Any]:
        """The batch stream, then the restored RNG state: building the stream may draw from
        the global RNG (DataLoader seeds its workers from it), as it did in the run resumed."""
        iterator = iter(self.train_loader(self.start_iter))
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        self.model.train()
        return iterator

    def train(self) -> TrainOutcome:
        """Train from ``start_iter`` to ``max_iter`` (or until SIGTERM / SIGINT)."""
        monitor = TrainingMonitor(
            self.output_dir, self.device, self.start_iter, self.max_iter, is_main_process()
        )
        logger.info(
            "Training iterations %d to %d on %s (amp %s, %d process(es))",
            self.start_iter,
            self.max_iter,
            self.device,
            self.amp,
            get_world_size(),
        )
        try:
            with StopRequest() as stop:
                iterator = self._start()
                for iteration in range(self.start_iter + 1, self.max_iter + 1):
                    step_stop = self._train_one(iteration, iterator, stop, monitor)
                    if step_stop:
                        return self._stop_early(iteration, stop)
                    self._periodic(iteration, monitor)
            return self._finish(monitor)
        finally:
            monitor.close()

    def _train_one(
        self, iteration: int, iterator: Iterator[Any], stop: StopRequest, monitor: TrainingMonitor
    ) -> bool:
        """Iteration number ``iteration`` (1-based); returns whether to stop after it."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[self._lr_group]["lr"]  # the lr this step uses
        batch = next(iterator)
        data_time = time.perf_counter() - start
        step = self.run_step(batch, stop.requested)
        if step.bad:
            self._handle_bad_step(iteration, batch, step)
        else:
            self._bad_streak = 0
            values = {**step.losses, "total_loss": step.total}
            if step.grad_norm is not None:
                values["grad_norm"] = step.grad_norm
            monitor.record(values, time.perf_counter() - start, data_time)
        if iteration % self.log_period == 0 or iteration == self.max_iter:
            monitor.log(iteration, lr)
        monitor.advance()
        return step.stop or (get_world_size() == 1 and stop.requested)

    def _periodic(self, iteration: int, monitor: TrainingMonitor) -> None:
        if iteration == self.max_iter:
            return
        if self.checkpoint_period > 0 and iteration % self.checkpoint_period == 0:
            self.save_checkpoint(f"model_{iteration:07d}", iteration)
        if self.eval_period > 0 and iteration % self.eval_period == 0:
            self.evaluate(iteration, monitor)

    def _stop_early(self, iteration: int, stop: StopRequest) -> TrainOutcome:
        path = self.save_checkpoint(f"model_{iteration:07d}", iteration)
        name = stop.signal_name or "a signal on another rank"
        logger.warning(
            "Stopped by %s after iteration %d of %d; checkpoint %s. Run again with resume to "
            "continue from it.",
            name,
            iteration,
            self.max_iter,
            path,
        )
        return TrainOutcome(iteration, False, {}, name)

    def evaluate(self, iteration: int, monitor: TrainingMonitor | None = None) -> dict[str, Any]:
        """Run the evaluation and visualisation callbacks without disturbing the training
        RNG streams (test loaders draw from them), so evaluating never changes training."""
        if self.evaluate_fn is None:
            return {}
        rng = get_rng_state()
        try:
            metrics = dict(self.evaluate_fn(self.model))
            image = (
                self.visualize_fn(self.model) if self.visualize_fn and is_main_process() else None
            )
        finally:
            set_rng_state(rng)
            self.model.train()
        if is_main_process():
            logger.info("Evaluation at iteration %d: %s", iteration, _summary(metrics))
            if monitor is not None:
                monitor.write_metrics(metrics, iteration)
                if image is not None:
                    monitor.add_image("val/detections", image, iteration)
        wait_for_main_process()
        return metrics

    def _finish(self, monitor: TrainingMonitor) -> TrainOutcome:
        if self.start_iter < self.max_iter:
            self.save_checkpoint("model_final", self.max_iter)
        metrics = self.evaluate(self.max_iter, monitor)
        if metrics and is_main_process():
            _write_json_atomic(self.output_dir / "metrics.json", metrics)
        logger.info("Training finished at iteration %d", self.max_iter)
        return TrainOutcome(self.max_iter, True, metrics)


def _summary(metrics: Mapping[str, Any]) -> str:
    """Top-level numbers of each result, e.g. ``bbox: AP 37.20 AP50 58.10``."""
    parts = []
    for name, values in metrics.items():
        if isinstance(values, Mapping):
            numbers = " ".join(
                f"{k} {float(v):.2f}" for k, v in values.items() if isinstance(v, (int, float))
            )
            parts.append(f"{name}: {numbers}")
    return "; ".join(parts)
