"""Non-finite losses in a real training run (issue 4, test 4).

The quick-start detector and data pipeline are built from the config with build_trainer and run
in this process; one loss of the real model is multiplied by NaN at chosen iterations (so the
gradients are NaN too), without any test hook in the production code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tooling import tiny_overrides

from frcnn.build import build_model, build_trainer, prepare_data
from frcnn.config import load_config
from frcnn.engine import Trainer
from frcnn.engine.checkpoint import Checkpointer, load_checkpoint

QUICKSTART = "configs/quickstart.yaml"


class Poisoner:
    """Wraps the model's forward: counts training calls (= iterations), keeps the parameters as
    they were when each began, and multiplies ``rcnn_loss_box`` by NaN at ``iterations``.

    Parameters only: batch-norm statistics have a test of their own below."""

    def __init__(self, model: torch.nn.Module, iterations: Callable[[int], bool]) -> None:
        self.model = model
        self.iterations = iterations
        self.weights_before: dict[int, dict[str, torch.Tensor]] = {}
        self._forward = model.forward
        model.forward = self  # type: ignore[method-assign]

    def __call__(self, images: list, targets: list | None = None, **kwargs: Any) -> Any:
        if not self.model.training:
            return self._forward(images, targets, **kwargs)
        iteration = len(self.weights_before) + 1
        self.weights_before[iteration] = {
            k: v.detach().clone() for k, v in self.model.named_parameters()
        }
        losses = dict(self._forward(images, targets, **kwargs))
        if self.iterations(iteration):
            losses["rcnn_loss_box"] = losses["rcnn_loss_box"] * float("nan")
        return losses


def _trainer(tmp_path: Path, shapes_root: Path, *extra: str) -> tuple[Trainer, list[list[int]]]:
    """The quick-start trainer (tiny) and the image ids of each batch it will be given."""
    cfg = load_config(QUICKSTART, [*tiny_overrides(shapes_root, tmp_path / "out"), *extra])
    prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    trainer = build_trainer(cfg, model, torch.device("cpu"), Path(cfg.output_dir))
    batches: list[list[int]] = []
    make_loader = trainer.train_loader

    def recording(start_iter: int) -> Iterator[Any]:
        for batch in make_loader(start_iter):
            batches.append([info.image_id for info in batch.infos])
            yield batch

    trainer.train_loader = recording
    return trainer, batches


def _finite(state: dict[str, Any]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


def test_one_nan_batch_is_skipped_and_reported(tmp_path: Path, shapes_root: Path) -> None:
    trainer, batches = _trainer(tmp_path, shapes_root)
    poison = Poisoner(trainer.model, lambda iteration: iteration == 4)
    outcome = trainer.train()
    assert outcome.completed and outcome.iteration == 6
    before = poison.weights_before
    # iteration 3 moved the weights; iteration 4 (skipped) left them exactly as they were
    assert any(not torch.equal(before[3][k], before[4][k]) for k in before[3])
    assert all(torch.equal(before[4][k], before[5][k]) for k in before[4])
    assert any(not torch.equal(before[5][k], before[6][k]) for k in before[5])
    output = Path(trainer.output_dir)
    reports = sorted((output / "bad_batches").glob("*.json"))
    assert [path.name for path in reports] == ["iter_0000004.json"]
    report = json.loads(reports[0].read_text())
    assert [image["image_id"] for image in report["images"]] == batches[3]
    assert report["losses"]["rcnn_loss_box"] == "nan" and report["total_loss"] == "nan"
    assert report["loss_non_finite_on_this_rank"] is True
    assert all(isinstance(v, float) for k, v in report["losses"].items() if k != "rcnn_loss_box")
    assert (
        "Iteration 4: non-finite loss or gradients, step skipped"
        in (output / "log.txt").read_text()
    )
    final = load_checkpoint(output / "checkpoints" / "model_final.pth")
    assert _finite(final["model"]) and _finite(dict(trainer.model.state_dict()))


def test_repeated_nans_stop_training_and_keep_a_finite_checkpoint(
    tmp_path: Path, shapes_root: Path
) -> None:
    trainer, batches = _trainer(
        tmp_path, shapes_root, "solver.max_bad_steps=3", "solver.checkpoint_period=2"
    )
    Poisoner(trainer.model, lambda iteration: iteration >= 3)
    with pytest.raises(
        FloatingPointError, match="3 consecutive non-finite training steps"
    ) as error:
        trainer.train()
    assert "up to iteration 5" in str(error.value) and "bad_batches" in str(error.value)
    output = Path(trainer.output_dir)
    assert len(list((output / "bad_batches").glob("*.json"))) == 3
    last = Checkpointer(output).last()
    assert last is not None and last.name == "model_0000004.pth"
    state = load_checkpoint(last)
    assert state["iteration"] == 4 and _finite(state["model"])
    for per_parameter in state["optimizer"]["state"].values():
        assert _finite(per_parameter)
    # the checkpoint written during the streak holds the parameters of the last good step
    good = load_checkpoint(output / "checkpoints" / "model_0000002.pth")
    names = [name for name, _ in trainer.model.named_parameters()]
    assert all(torch.equal(good["model"][k], state["model"][k]) for k in names)
    assert not (output / "checkpoints" / "model_final.pth").exists()
    assert len(batches) == 5


def test_a_skipped_step_leaves_batch_norm_statistics_untouched(
    tmp_path: Path, shapes_root: Path
) -> None:
    """Activations that overflow at one step would write NaN into every BatchNorm's running
    statistics during that step's forward; the skipped step must not keep them."""
    trainer, _ = _trainer(tmp_path, shapes_root)
    first_conv = trainer.model.backbone.body[0][0]
    calls = {"n": 0}

    def overflow_once(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> Any:
        if module.training:
            calls["n"] += 1
            if calls["n"] == 4:
                return output * float("inf")
        return None

    first_conv.register_forward_hook(overflow_once)
    outcome = trainer.train()
    assert outcome.completed
    assert (Path(trainer.output_dir) / "bad_batches" / "iter_0000004.json").is_file()
    final = load_checkpoint(Path(trainer.output_dir) / "checkpoints" / "model_final.pth")
    stats = {k: v for k, v in final["model"].items() if "running_" in k}
    assert stats and _finite(stats)
