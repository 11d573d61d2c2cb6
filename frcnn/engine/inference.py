"""Distributed inference and evaluation over a test loader."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from frcnn.engine.amp import autocast
from frcnn.engine.distributed import (
    all_gather_object,
    broadcast_object,
    is_main_process,
    unwrap_model,
)
from frcnn.structures import Detections

logger = logging.getLogger(__name__)

Prediction = tuple[int, Detections]


class Evaluator(Protocol):
    def update(self, image_ids: list[int], detections: list[Detections]) -> None: ...

    def evaluate(self) -> dict[str, Any]: ...


def _length(data_loader: Iterable) -> int | None:
    try:
        return len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def predict(
    model: nn.Module, data_loader: Iterable, device: torch.device, amp: str = "off"
) -> list[Prediction]:
    """(image_id, Detections on the CPU) for every image this rank's loader yields.

    Runs the plain module (not a DDP wrapper, whose forward could start collectives that the
    other ranks, holding a different number of batches, never join) in eval mode.
    """
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    predictions: list[Prediction] = []
    bar = tqdm(
        total=_length(data_loader), desc="inference", disable=not is_main_process(), leave=False
    )
    try:
        with torch.inference_mode():
            for batch in data_loader:
                batch = batch.to(device)
                sizes = [info.original_size for info in batch.infos]
                with autocast(device, amp):
                    detections = module(batch.images, original_sizes=sizes)
                for info, det in zip(batch.infos, detections, strict=True):
                    predictions.append((int(info.image_id), det.to("cpu")))
                bar.update(1)
    finally:
        bar.close()
        module.train(was_training)
    return predictions


def merge_predictions(per_rank: Iterable[list[Prediction]]) -> list[Prediction]:
    """One prediction per image id, sorted by id; a distributed sampler pads the last ranks
    with repeated images, which are dropped here."""
    merged: dict[int, Detections] = {}
    for predictions in per_rank:
        for image_id, det in predictions:
            merged.setdefault(image_id, det)
    return sorted(merged.items(), key=lambda item: item[0])


def inference_on_dataset(
    model: nn.Module,
    data_loader: Iterable,
    evaluators: Mapping[str, Evaluator],
    device: torch.device,
    amp: str = "off",
) -> dict[str, dict[str, Any]]:
    """Predict on every rank, gather to rank 0, evaluate there; every rank gets the results.

    ``evaluators`` maps a result name to a fresh evaluator, e.g. ``{"bbox": coco, "voc": voc}``
    gives ``{"bbox": coco.evaluate(), "voc": voc.evaluate()}``. Evaluators accumulate, so build
    new ones for each call.
    """
    start = time.perf_counter()
    local = predict(model, data_loader, device, amp)
    seconds = time.perf_counter() - start
    gathered = all_gather_object(local)
    results: dict[str, dict[str, Any]] = {}
    if is_main_process():
        predictions = merge_predictions(gathered)
        logger.info(
            "Inference on %d images: %.1f s, %.2f images/s on this rank (%.3f s/image)",
            len(predictions),
            seconds,
            len(local) / max(seconds, 1e-9),
            seconds / max(len(local), 1),
        )
        image_ids = [image_id for image_id, _ in predictions]
        detections = [det for _, det in predictions]
        for name, evaluator in evaluators.items():
            evaluator.update(image_ids, detections)
            results[name] = evaluator.evaluate()
    # Also the other ranks' wait for rank 0's evaluation, on the long-timeout group.
    return broadcast_object(results)
