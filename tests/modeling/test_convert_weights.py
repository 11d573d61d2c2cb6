"""tools/convert_weights.py end to end on a torchvision checkpoint saved to disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

from frcnn.build import build_model
from frcnn.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_converts_a_torchvision_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    source = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), source)
    output = tmp_path / "frcnn.pth"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_weights.py"),
            "--arch",
            "fasterrcnn_mobilenet_v3_large_fpn",
            "--input",
            str(source),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(output, map_location="cpu", weights_only=True)
    cfg = load_config(ROOT / "configs" / "torchvision" / "fasterrcnn_mobilenet_v3_large_fpn.yaml")
    model = build_model(cfg.model)
    model.load_state_dict(checkpoint["model"])
    torch.testing.assert_close(
        model.roi_heads.box_predictor.cls_score.weight,
        reference.roi_heads.box_predictor.cls_score.weight,
    )


def test_refuses_a_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    source = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, source)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_weights.py"),
            "--arch",
            "fasterrcnn_resnet50_fpn",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "o.pth"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "not a torchvision fasterrcnn_resnet50_fpn checkpoint" in result.stderr
