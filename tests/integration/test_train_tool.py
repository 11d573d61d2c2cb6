"""tools/train.py, test.py and demo.py end to end on a tiny generated dataset (CPU)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tooling import run_tool, tiny_overrides

QUICKSTART = "configs/quickstart.yaml"


def _train(shapes_root: Path, output_dir: Path, *extra: str, resume: bool = False):
    args = ["tools/train.py", "--config", QUICKSTART]
    if resume:
        args.append("--resume")
    args += ["--opts", *tiny_overrides(shapes_root, output_dir), *extra]
    result = run_tool(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _final_model(output_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(
        output_dir / "checkpoints" / "model_final.pth", map_location="cpu", weights_only=True
    )
    return checkpoint["model"]


def test_train_writes_outputs_and_resume_equals_uninterrupted(
    tmp_path: Path, shapes_root: Path
) -> None:
    full = tmp_path / "full"
    _train(shapes_root, full)
    for name in ("config.yaml", "log.txt", "metrics.json"):
        assert (full / name).is_file(), name
    metrics = json.loads((full / "metrics.json").read_text())
    assert set(metrics["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    events = EventAccumulator(str(full), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"rpn_loss_cls", "rpn_loss_box", "rcnn_loss_cls", "rcnn_loss_box", "lr"} <= {
        tag.split("/")[-1] for tag in scalars
    }, scalars
    assert any("AP50" in tag for tag in scalars), scalars
    assert events.Tags()["images"], "ground truth / detection panels"

    # the same run, stopped after its checkpoint at iteration 3 and continued with --resume
    interrupted = tmp_path / "interrupted"
    _train(shapes_root, interrupted)
    checkpoints = interrupted / "checkpoints"
    (checkpoints / "model_final.pth").unlink()
    for later in checkpoints.glob("model_000000[4-9].pth"):
        later.unlink()
    (checkpoints / "last_checkpoint").write_text("model_0000003.pth")
    _train(shapes_root, interrupted, resume=True)

    expected, resumed = _final_model(full), _final_model(interrupted)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_test_and_demo_tools(tmp_path: Path, shapes_root: Path) -> None:
    output = tmp_path / "run"
    _train(shapes_root, output, "solver.max_iter=3", "solver.steps=[2]")
    weights = output / "checkpoints" / "model_final.pth"
    overrides = tiny_overrides(shapes_root, output)
    result = run_tool(
        [
            "tools/test.py",
            "--config",
            QUICKSTART,
            "--weights",
            str(weights),
            "--output-dir",
            str(tmp_path / "eval"),
            "--opts",
            *overrides,
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AP50" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["bbox"]

    demo_out = tmp_path / "demo"
    result = run_tool(
        [
            "tools/demo.py",
            "--config",
            QUICKSTART,
            "--weights",
            str(weights),
            "--input",
            str(shapes_root / "coco" / "val"),
            "--output",
            str(demo_out),
            "--score-thresh",
            "0.0",
            "--opts",
            *overrides,
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    detections = json.loads((demo_out / "detections.json").read_text())
    pictures = sorted(demo_out.glob("*.jpg"))
    assert len(pictures) == 4
    for entry in detections:
        assert set(entry) == {"file_name", "category_id", "bbox", "score"}
        assert entry["category_id"] in {1, 3, 7, 9}  # the dataset's own ids, not labels
        x, y, w, h = entry["bbox"]
        assert w >= 0 and h >= 0 and 0 <= x <= 96 and 0 <= y <= 96


def test_torchrun_two_processes_train_and_evaluate(tmp_path: Path, shapes_root: Path) -> None:
    output = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [
        "tools/train.py",
        "--config",
        QUICKSTART,
        "--opts",
        *tiny_overrides(shapes_root, output, max_iter=4),
    ]
    result = run_tool(args, launcher=launcher)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert "AP50" in metrics["bbox"]
    assert (output / "checkpoints" / "model_final.pth").is_file()


def test_bad_config_fails_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = run_tool(["tools/train.py", "--config", QUICKSTART, "--opts", "solver.base_lrr=0.1"])
    assert result.returncode == 2
    assert "did you mean 'solver.base_lr'" in result.stderr
    assert "Traceback" not in result.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_class_count_must_match_the_dataset(tmp_path: Path, shapes_root: Path) -> None:
    opts = [*tiny_overrides(shapes_root, tmp_path / "run"), "model.num_classes=5"]
    result = run_tool(["tools/train.py", "--config", QUICKSTART, "--opts", *opts])
    assert result.returncode == 2
    assert "model.num_classes=5 but data.train has 4 classes" in result.stderr
    assert "Traceback" not in result.stderr
