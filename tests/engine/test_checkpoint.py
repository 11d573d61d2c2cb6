from __future__ import annotations

import logging
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from engine_fakes import FakeDetector

from frcnn.engine import checkpoint as checkpoint_module
from frcnn.engine.checkpoint import (
    Checkpointer,
    CheckpointError,
    check_plain_state,
    is_complete,
    load_checkpoint,
    load_model_weights,
)


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "iteration": int(value), "config": {"a": [1]}}


def test_save_points_at_newest_and_keeps_two(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep=2)
    assert ckpt.last() is None
    for it in (1, 2, 3):
        ckpt.save(f"model_{it:07d}", _state(it))
    ckpt.save("model_final", _state(4))
    names = sorted(p.name for p in ckpt.directory.iterdir())
    assert names == ["last_checkpoint", "model_0000002.pth", "model_0000003.pth", "model_final.pth"]
    assert (ckpt.directory / "last_checkpoint").read_text() == "model_final.pth"
    assert ckpt.last() == ckpt.directory / "model_final.pth"
    loaded = ckpt.load(ckpt.last())
    assert loaded["iteration"] == 4 and torch.equal(loaded["model"]["w"], torch.full((3,), 4.0))


def test_crash_while_writing_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Checkpointer(tmp_path)
    good = ckpt.save("model_0000001", _state(1))

    def partial_save(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", partial_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0000002", _state(2))
    monkeypatch.undo()
    assert ckpt.last() == good
    assert sorted(p.name for p in ckpt.directory.iterdir()) == [
        "last_checkpoint",
        "model_0000001.pth",
    ]


def test_truncated_or_missing_newest_falls_back(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep=3)
    first = ckpt.save("model_0000001", _state(1))
    second = ckpt.save("model_0000002", _state(2))
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])  # the pointer still names it
    assert not is_complete(second) and is_complete(first)
    assert ckpt.last() == first
    second.unlink()
    ckpt.save("model_0000003", _state(3)).unlink()  # pointer names a missing file
    assert ckpt.last() == first
    with pytest.raises(CheckpointError, match="refusing checkpoint"):
        second.write_bytes(data[: len(data) // 2])
        load_checkpoint(second)


class Payload:
    """Unpickling this runs os.mkdir(marker): the kind of file weights_only must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_weights_only_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.is_dir()


def test_non_plain_values_refused_before_writing(tmp_path: Path) -> None:
    Point = namedtuple("Point", "x y")
    with pytest.raises(TypeError, match=r"state\['config'\]\['anchor'\] is a .*Point"):
        check_plain_state({"config": {"anchor": Point(1, 2)}})
    with pytest.raises(TypeError, match="numpy"):
        import numpy as np

        Checkpointer(tmp_path).save("model_0000001", {"lr": np.float64(0.1)})
    assert Checkpointer(tmp_path).last() is None


def _fresh(num_classes: int, seed: int) -> FakeDetector:
    torch.manual_seed(seed)
    return FakeDetector(num_classes=num_classes)


def test_load_model_weights_strict_errors_name_keys() -> None:
    model = _fresh(3, 0)
    state = _fresh(3, 1).state_dict()
    state["conv.weight"] = torch.zeros(8, 3, 5, 5)
    state["extra.bias"] = torch.zeros(1)
    del state["norm.weight"]
    with pytest.raises(ValueError) as info:
        load_model_weights(model, state)
    message = str(info.value)
    assert "missing from the checkpoint: norm.weight" in message
    assert "not in the model: extra.bias" in message
    assert "shape of conv.weight: checkpoint (8, 3, 5, 5) vs model (8, 3, 3, 3)" in message


def test_head_reinit_on_class_count_change(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("frcnn"), "propagate", True)
    source = _fresh(5, 1)
    model = _fresh(3, 0)
    fresh_head = model.box_predictor.weight.detach().clone()
    with pytest.raises(ValueError, match="box_predictor.weight"):
        load_model_weights(model, source.state_dict(), allow_head_reinit=False)
    with caplog.at_level(logging.WARNING):
        reinit = load_model_weights(model, source.state_dict(), allow_head_reinit=True)
    assert reinit == ["box_predictor.weight", "box_predictor.bias"]
    assert "Re-initialising box_predictor.weight" in caplog.text
    assert torch.equal(model.box_predictor.weight, fresh_head)
    assert torch.equal(model.conv.weight, source.conv.weight)


def test_ddp_prefix_is_stripped() -> None:
    source = _fresh(3, 1)
    model = _fresh(3, 0)
    load_model_weights(model, {f"module.{k}": v for k, v in source.state_dict().items()})
    assert torch.equal(model.box_head.weight, source.box_head.weight)
