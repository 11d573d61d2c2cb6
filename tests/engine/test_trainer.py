from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from engine_fakes import LOSS_NAMES, FakeStream, make_batch, make_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from frcnn.engine.checkpoint import load_checkpoint
from frcnn.engine.trainer import Trainer
from frcnn.engine.visualize import draw_detection_panels


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _assert_same_training_state(a: Trainer, b: Trainer) -> None:
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name
    state_a, state_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        for name, value in state_a[key].items():
            assert torch.equal(value, state_b[key][name]), (key, name)
    assert a.scheduler.state_dict()["last_epoch"] == b.scheduler.state_dict()["last_epoch"]


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    straight = make_trainer(tmp_path / "a", max_iter=6, checkpoint_period=3)
    straight.resume_or_load(resume=True)
    assert straight.train().completed

    crashed = make_trainer(tmp_path / "b", FakeStream(crash_at=5), max_iter=6, checkpoint_period=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    # A different initialisation and global RNG position: all of it must come from the file.
    resumed = make_trainer(tmp_path / "b", max_iter=6, checkpoint_period=3, model_seed=123)
    assert resumed.resume_or_load(resume=True) == 3
    torch.manual_seed(999)
    resumed.train()
    _assert_same_training_state(straight, resumed)
    final = load_checkpoint(tmp_path / "b" / "checkpoints" / "model_final.pth")
    assert final["iteration"] == 6 and final["config"] == {}


def test_without_rng_restore_resume_differs(tmp_path: Path) -> None:
    # Guards the test above: dropout makes the result depend on the restored RNG state.
    straight = make_trainer(tmp_path / "a", max_iter=4, checkpoint_period=2)
    straight.train()
    resumed = make_trainer(tmp_path / "a2", max_iter=4)
    resumed.load_state(load_checkpoint(tmp_path / "a" / "checkpoints" / "model_0000002.pth"))
    resumed._pending_rng = None
    resumed.train()
    assert not torch.equal(straight.model.conv.weight, resumed.model.conv.weight)


def test_non_finite_step_is_skipped_and_reported(tmp_path: Path) -> None:
    one_step = make_trainer(tmp_path / "one", max_iter=1)
    one_step.train()
    skipped = make_trainer(tmp_path / "bad", FakeStream(poisoned={2}), max_iter=2)
    outcome = skipped.train()
    assert outcome.completed
    _assert_same_training_state_except_schedule(one_step, skipped)
    assert all(torch.isfinite(p).all() for p in skipped.model.parameters())
    report = json.loads((tmp_path / "bad" / "bad_batches" / "iter_0000002.json").read_text())
    assert report["iteration"] == 2 and report["total_loss"] == "nan"
    assert set(report["losses"]) == set(LOSS_NAMES)
    first = report["images"][0]
    assert first["file_name"] == "img_00002.jpg" and first["image_id"] == 2
    assert "nan" in first["boxes"][0]
    assert not (tmp_path / "bad" / "bad_batches" / "iter_0000001.json").exists()


def _assert_same_training_state_except_schedule(a: Trainer, b: Trainer) -> None:
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name
    for key, state in a.optimizer.state_dict()["state"].items():
        assert torch.equal(
            state["momentum_buffer"], b.optimizer.state_dict()["state"][key]["momentum_buffer"]
        )


def test_consecutive_bad_steps_raise(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "a", FakeStream(poisoned={2, 3, 4}), max_bad_steps=3)
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite training steps"):
        trainer.train()
    assert len(list((tmp_path / "a" / "bad_batches").glob("*.json"))) == 3
    # Not consecutive: the streak resets on a good step.
    trainer = make_trainer(tmp_path / "b", FakeStream(poisoned={2, 4}), max_bad_steps=2)
    assert trainer.train().completed


def test_sigterm_checkpoints_current_iteration(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(tmp_path, FakeStream(sigterm_at=3), max_iter=6)
    outcome = trainer.train()
    assert (outcome.completed, outcome.iteration, outcome.stop_signal) == (False, 3, "SIGTERM")
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "last_checkpoint").read_text() == "model_0000003.pth"
    assert load_checkpoint(checkpoints / "model_0000003.pth")["iteration"] == 3
    assert not (checkpoints / "model_final.pth").exists()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "Stopped by SIGTERM after iteration 3" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu_is_finite(tmp_path: Path, amp: str) -> None:
    trainer = make_trainer(tmp_path, max_iter=3, amp=amp, clip_grad_norm=1.0)
    before = _params(trainer)
    assert trainer.train().completed
    assert not (tmp_path / "bad_batches").exists()
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(before["conv.weight"], after["conv.weight"])
    assert trainer.scaler.is_enabled() == (amp == "fp16")


def test_eval_logging_metrics_and_pruning(tmp_path: Path) -> None:
    calls: list[int] = []

    def evaluate(model: torch.nn.Module) -> dict:
        calls.append(1)
        torch.rand(10)  # draws from the global RNG, as test loaders do
        return {
            "bbox": {"AP": 12.5, "AP50": 30.0, "per_class": {"cat": 4.0}},
            "voc": {"mAP_07": 20.0},
        }

    def visualize(model: torch.nn.Module) -> torch.Tensor:
        batch = make_batch(0, batch_size=2)
        model.eval()
        with torch.no_grad():
            dets = model(batch.images, original_sizes=[i.image_size for i in batch.infos])
        return draw_detection_panels(batch.images, batch.targets, dets, score_thresh=0.0)

    trainer = make_trainer(
        tmp_path / "eval",
        visualize_fn=visualize,
        max_iter=6,
        eval_period=2,
        evaluate_fn=evaluate,
        checkpoint_period=1,
        log_period=2,
    )
    outcome = trainer.train()
    assert len(calls) == 3  # iterations 2, 4 and the final one
    assert outcome.metrics["bbox"]["AP"] == 12.5
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics == {
        "bbox": {"AP": 12.5, "AP50": 30.0, "per_class": {"cat": 4.0}},
        "voc": {"mAP_07": 20.0},
    }
    checkpoints = sorted(p.name for p in (tmp_path / "eval" / "checkpoints").iterdir())
    assert checkpoints == [
        "last_checkpoint",
        "model_0000004.pth",
        "model_0000005.pth",
        "model_final.pth",
    ]

    events = EventAccumulator(str(tmp_path / "eval"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        *LOSS_NAMES,
        "total_loss",
        "lr",
        "time/iter",
        "time/data",
        "memory/max_rss_mb",
        "grad_norm",
        "bbox/AP",
        "bbox/per_class/cat",
        "voc/mAP_07",
    } <= tags
    assert [e.step for e in events.Scalars("total_loss")] == [2, 4, 6]
    assert [e.step for e in events.Images("val/detections")] == [2, 4, 6]
    # base 0.05, warm-up from x0.1 over 2 iterations, x0.1 from index 3: the lr each logged
    # iteration used (iteration 2 is index 1, halfway through the warm-up)
    lrs = [e.value for e in events.Scalars("lr")]
    assert lrs == pytest.approx([0.05 * (0.1 * 0.5 + 0.5), 0.05 * 0.1, 0.05 * 0.1])
    assert "iter 4/6" in (tmp_path / "eval" / "log.txt").read_text()

    # Evaluating drew random numbers, yet training is that of a run without evaluation.
    plain = make_trainer(tmp_path / "plain", max_iter=6)
    plain.train()
    assert torch.equal(plain.model.conv.weight, trainer.model.conv.weight)


def test_trainer_rejects_non_plain_config(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="config"):
        make_trainer(tmp_path, config={"solver": object()})
