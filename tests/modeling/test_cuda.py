"""The same model on a GPU: a training step is finite and inference agrees with the CPU.
Skipped cleanly on machines without CUDA (all of CI's)."""

from __future__ import annotations

import pytest
import torch

from frcnn.build import build_model
from frcnn.config import Config, with_overrides
from frcnn.structures import Targets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

OVERRIDES = [
    "model.num_classes=3",
    "model.backbone.name=small",
    "model.backbone.norm=bn",
    "model.backbone.channels=64",
    "model.anchors.sizes=[[16, 32, 64]]",
    "model.roi_heads.representation_size=128",
    "model.roi_heads.batch_size_per_image=64",
]


def _inputs() -> tuple[list[torch.Tensor], list[Targets]]:
    g = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, 128, 160), generator=g, dtype=torch.uint8) for _ in range(2)
    ]
    targets = [
        Targets(torch.tensor([[10.0, 12.0, 60.0, 70.0]]), torch.tensor([1])),
        Targets.empty(),
    ]
    return images, targets


def test_training_step_on_cuda_is_finite() -> None:
    torch.manual_seed(0)
    model = build_model(with_overrides(Config(), OVERRIDES).model).cuda().train()
    images, targets = _inputs()
    losses = model([i.cuda() for i in images], [t.to("cuda") for t in targets])
    total = sum(losses.values())
    total.backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_inference_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    model = build_model(with_overrides(Config(), OVERRIDES).model).eval()
    images, _ = _inputs()
    with torch.no_grad():
        cpu = model(images)
        gpu = model.cuda()([i.cuda() for i in images])
    for a, b in zip(cpu, gpu):
        assert len(a) == len(b)
        torch.testing.assert_close(b.boxes.cpu(), a.boxes, atol=1e-2, rtol=1e-3)
