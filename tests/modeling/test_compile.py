"""model.compile: the compiled quick-start model trains and predicts as the eager one with the same
weights, and its checkpoints load with the switch off and on (same state_dict keys).

The fast test compiles with backend="eager" (Dynamo traces the modules, no code generation) and
counts the traced graphs; the inductor test (code generation with g++, tens of seconds cold) is
marked slow."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from frcnn.build import build_model
from frcnn.config import load_config
from frcnn.config.schema import ModelConfig
from frcnn.modeling.faster_rcnn import FasterRCNN
from frcnn.structures import Targets

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
# the model part of tests/integration/tooling.py's tiny_overrides, and fewer proposals
TINY = [
    "model.backbone.channels=32",
    "model.roi_heads.representation_size=64",
    "model.roi_heads.batch_size_per_image=32",
    "model.rpn.pre_nms_topk_train=200",
    "model.rpn.post_nms_topk_train=100",
    "model.rpn.pre_nms_topk_test=200",
    "model.rpn.post_nms_topk_test=100",
]


def _config(compile_: bool) -> ModelConfig:
    return load_config(QUICKSTART, [*TINY, f"model.compile={str(compile_).lower()}"]).model


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=generator),
        torch.randint(0, 256, (3, 112, 96), dtype=torch.uint8, generator=generator),
    ]


def _targets() -> list[Targets]:
    first = Targets(
        torch.tensor([[10.0, 12.0, 60.0, 50.0], [40.0, 30.0, 120.0, 90.0]]), torch.tensor([1, 3])
    )
    return [first, Targets.empty()]


def _pair(compiled_cfg: ModelConfig) -> tuple[FasterRCNN, FasterRCNN]:
    """The eager model and one built from ``compiled_cfg`` holding the same weights."""
    torch.manual_seed(0)
    eager = build_model(_config(False))
    compiled = build_model(compiled_cfg)
    compiled.load_state_dict(eager.state_dict(), strict=True)
    return eager, compiled


def _train_step(model: nn.Module) -> dict[str, torch.Tensor]:
    """Losses and, after backward, every gradient (sampling draws from the global generator,
    so both models are seeded alike)."""
    model.train()
    torch.manual_seed(1)
    losses = model(_images(), _targets())
    sum(losses.values()).backward()
    grads = {f"grad.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {**{k: v.detach() for k, v in losses.items()}, **grads}


def _predict(model: nn.Module) -> list:
    model.eval()
    with torch.inference_mode():
        return model(_images())


def _assert_same_run(eager: FasterRCNN, compiled: FasterRCNN) -> None:
    """One training step, one inference call, then training again after the mode switch."""
    expected, actual = _train_step(eager), _train_step(compiled)
    assert expected.keys() == actual.keys() and len(actual) > 4
    for name in expected:
        assert torch.isfinite(actual[name]).all(), name
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-4)
    detections, reference = _predict(compiled), _predict(eager)
    assert sum(len(d) for d in reference) > 0
    for det, ref in zip(detections, reference, strict=True):
        torch.testing.assert_close(det.boxes, ref.boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(det.scores, ref.scores, rtol=0, atol=1e-4)
        assert torch.equal(det.labels, ref.labels)
    again = _train_step(compiled)
    assert all(torch.isfinite(again[key]) for key in expected if not key.startswith("grad."))


def test_build_model_compiles_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        FasterRCNN, "compile_static_modules", lambda self, backend="inductor": calls.append(backend)
    )
    build_model(_config(False))
    assert calls == []
    build_model(_config(True))
    assert calls == ["inductor"]


def test_compiled_step_and_inference_equal_eager() -> None:
    """backend="eager" still runs the traced graphs: a graph that computed something else, or
    modules that were never traced, fail here."""
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()  # graphs cached by an earlier test would not be traced again
    eager, compiled = _pair(_config(False))
    compiled.compile_static_modules(backend=counting_backend)
    _assert_same_run(eager, compiled)
    # backbone, RPN head, box head, predictor: traced for training and again for inference mode
    assert len(graphs) >= 8


@pytest.mark.slow
def test_inductor_step_and_inference_equal_eager() -> None:
    torch._dynamo.reset()
    _assert_same_run(*_pair(_config(True)))


def test_checkpoints_load_with_compile_on_or_off() -> None:
    eager = build_model(_config(False))
    compiled = build_model(_config(False))
    compiled.compile_static_modules(backend="eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    for source, target in ((compiled, eager), (eager, compiled)):
        with torch.no_grad():
            for parameter in source.parameters():
                parameter.add_(torch.randn_like(parameter))
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        for (name, mine), theirs in zip(target.state_dict().items(), source.state_dict().values()):
            assert torch.equal(mine, theirs), name
