"""A tiny deterministic detector and batch stream with the model / loader contracts of frcnn.

In a module of its own (not conftest.py) because every test folder has a conftest.py and
`from conftest import ...` would pick whichever was imported last.

FakeDetector: train mode returns the four scalar losses, each a mean over images of per-image
losses computed one image at a time (so a DDP step on shards equals a step on the whole batch);
eval mode returns one detection per image from a learned box. FakeStream(start_iter) yields
Batch-like objects for iterations start_iter, start_iter + 1, ... from per-iteration seeds.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frcnn.engine.optim import build_lr_scheduler, build_optimizer
from frcnn.engine.trainer import Trainer
from frcnn.structures import Detections, ImageInfo, Targets

LOSS_NAMES = ("rpn_loss_cls", "rpn_loss_box", "rcnn_loss_cls", "rcnn_loss_box")
NUM_CLASSES = 3


class FakeDetector(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.dropout = nn.Dropout(dropout)
        self.objectness = nn.Linear(8, 1)
        self.box_head = nn.Linear(8, 4)
        self.box_predictor = nn.Linear(8, num_classes + 1)

    def features(self, image: Tensor) -> Tensor:
        x = image.float().unsqueeze(0) / 255.0
        x = F.relu(self.norm(self.conv(x)))
        return x.mean(dim=(2, 3)).squeeze(0)

    def forward(
        self,
        images: list[Tensor],
        targets: list[Targets] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[Detections]:
        if self.training:
            assert targets is not None
            per_image = [self._image_losses(img, t) for img, t in zip(images, targets)]
            return {k: torch.stack([losses[k] for losses in per_image]).mean() for k in LOSS_NAMES}
        assert original_sizes is not None
        return [self._detect(img, size) for img, size in zip(images, original_sizes)]

    def _image_losses(self, image: Tensor, target: Targets) -> dict[str, Tensor]:
        h, w = image.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        feat = self.dropout(self.features(image))
        if len(target) > 0:
            gt_box, label = target.boxes.mean(0) / scale, target.labels[:1]
        else:
            gt_box, label = torch.zeros(4), torch.zeros(1, dtype=torch.int64)
        pred_box = torch.sigmoid(self.box_head(feat)).float()
        objectness = self.objectness(feat).float().squeeze(0)
        logits = self.box_predictor(feat).float()
        has_object = torch.tensor(float(len(target) > 0))
        return {
            "rpn_loss_cls": F.binary_cross_entropy_with_logits(objectness, has_object),
            "rpn_loss_box": F.smooth_l1_loss(pred_box, gt_box, beta=1 / 9),
            "rcnn_loss_cls": F.cross_entropy(logits.unsqueeze(0), label),
            "rcnn_loss_box": F.l1_loss(pred_box, gt_box),
        }

    def _detect(self, image: Tensor, original_size: tuple[int, int]) -> Detections:
        oh, ow = original_size
        feat = self.features(image)
        corners = torch.sigmoid(self.box_head(feat)).float() * torch.tensor([ow, oh, ow, oh])
        box = torch.stack(
            [
                torch.minimum(corners[0], corners[2]),
                torch.minimum(corners[1], corners[3]),
                torch.maximum(corners[0], corners[2]),
                torch.maximum(corners[1], corners[3]),
            ]
        )
        probs = torch.softmax(self.box_predictor(feat).float(), dim=0)
        score, label = probs[1:].max(dim=0)
        return Detections(box[None], score[None], (label + 1)[None])


@dataclass
class FakeBatch:
    images: list[Tensor]
    targets: list[Targets]
    infos: list[ImageInfo]

    def to(self, device: torch.device | str) -> FakeBatch:
        return FakeBatch(
            [img.to(device) for img in self.images],
            [t.to(device) for t in self.targets],
            self.infos,
        )


def make_batch(iteration: int, batch_size: int, seed: int = 0) -> FakeBatch:
    """Batch of iteration ``iteration`` (0-based), a function of (seed, iteration) only."""
    gen = torch.Generator().manual_seed(seed * 100_003 + iteration)
    images, targets, infos = [], [], []
    for index in range(batch_size):
        h, w = 16, 16 + 4 * int(torch.randint(0, 2, (1,), generator=gen))
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen))
        num_boxes = int(torch.randint(0, 3, (1,), generator=gen))
        xy = torch.rand(num_boxes, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        wh = 2 + torch.rand(num_boxes, 2, generator=gen) * torch.tensor([w / 2 - 2, h / 2 - 2])
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, NUM_CLASSES + 1, (num_boxes,), generator=gen)
        targets.append(Targets(boxes, labels))
        image_id = iteration * batch_size + index
        infos.append(ImageInfo(image_id, f"img_{image_id:05d}.jpg", (2 * h, 2 * w), (h, w)))
    return FakeBatch(images, targets, infos)


def poison(batch: FakeBatch, index: int = 0) -> FakeBatch:
    """A NaN coordinate in one ground-truth box (adds a box when the image has none)."""
    target = batch.targets[index]
    boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0]]) if len(target) == 0 else target.boxes.clone()
    labels = torch.ones(1, dtype=torch.int64) if len(target) == 0 else target.labels
    boxes[0, 2] = float("nan")
    batch.targets[index] = Targets(boxes, labels)
    return batch


@dataclass
class FakeStream:
    """Callable ``start_iter -> infinite iterator of batches``; iteration numbers in
    ``poisoned``, ``crash_at`` and ``sigterm_at`` are 1-based like the trainer's."""

    batch_size: int = 2
    seed: int = 0
    shard: tuple[int, int] = (0, 1)  # (rank, world size): this rank's slice of each batch
    poisoned: set[int] = field(default_factory=set)
    crash_at: int | None = None
    sigterm_at: int | None = None

    def __call__(self, start_iter: int) -> Iterator[FakeBatch]:
        for index in itertools.count(start_iter):
            iteration = index + 1
            if iteration == self.crash_at:
                raise RuntimeError(f"simulated crash while loading iteration {iteration}")
            if iteration == self.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            batch = make_batch(index, self.batch_size, self.seed)
            rank, world = self.shard
            batch = FakeBatch(
                batch.images[rank::world], batch.targets[rank::world], batch.infos[rank::world]
            )
            if iteration in self.poisoned:
                batch = poison(batch)
            yield batch


def make_trainer(
    output_dir: os.PathLike | str,
    stream: Callable[[int], Iterator[FakeBatch]] | None = None,
    model: nn.Module | None = None,
    model_seed: int = 0,
    optimizer: str = "sgd",
    max_iter: int = 6,
    schedule_iters: int = 6,
    **kwargs: object,
) -> Trainer:
    """Trainer on FakeDetector (seeded init) with SGD and a warm-up + step schedule over
    ``schedule_iters`` iterations."""
    if model is None:
        torch.manual_seed(model_seed)
        model = FakeDetector()
    opt = build_optimizer(model, optimizer, base_lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = build_lr_scheduler(
        opt,
        "step",
        schedule_iters,
        steps=[schedule_iters // 2],
        gamma=0.1,
        warmup_iters=2,
        warmup_factor=0.1,
    )
    options: dict = {"log_period": 2, "device": torch.device("cpu")}
    options.update(kwargs)
    return Trainer(
        model,
        opt,
        sched,
        stream or FakeStream(),
        output_dir=output_dir,
        max_iter=max_iter,
        **options,
    )
