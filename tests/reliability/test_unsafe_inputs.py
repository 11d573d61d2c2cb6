"""Checkpoints and configs that carry code (issue 4, test 5).

A checkpoint whose pickle calls os.mkdir when unpickled, handed to tools/train.py through --resume
and through model.weights, and a YAML config with a ``!!python/object/apply`` tag, in a file and
in --opts: each is refused and the directory its payload would create never appears. A guard
test shows the payloads do run when loaded unsafely, so their absence means something.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from tooling import ROOT, run_tool, tiny_overrides

QUICKSTART = "configs/quickstart.yaml"


class _MakeDirectory:
    """Unpickling this calls os.mkdir(path): the stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.path,))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "iteration": 3, "payload": _MakeDirectory(marker)}, path)
    return path


def _yaml_payload(marker: Path) -> str:
    return f"!!python/object/apply:os.mkdir [{str(marker)!r}]"


def test_the_payloads_run_when_loaded_unsafely(tmp_path: Path) -> None:
    marker = tmp_path / "pickle_ran"
    checkpoint = _malicious_checkpoint(tmp_path / "evil.pth", marker)
    torch.load(checkpoint, weights_only=False)
    assert marker.is_dir()
    yaml_marker = tmp_path / "yaml_ran"
    yaml.unsafe_load(f"seed: {_yaml_payload(yaml_marker)}")
    assert yaml_marker.is_dir()


def _assert_refused_checkpoint(result, marker: Path, checkpoint: Path) -> None:
    assert result.returncode == 2
    assert f"refusing checkpoint {checkpoint}" in result.stderr
    assert "weights_only=True" in result.stderr
    # one message, without torch's advice to load the file unsafely
    assert "Traceback" not in result.stderr
    assert "set to `False`" not in result.stderr
    assert not marker.exists()


def test_malicious_checkpoint_through_resume(tmp_path: Path, shapes_root: Path) -> None:
    output, marker = tmp_path / "run", tmp_path / "pickle_ran"
    checkpoint = _malicious_checkpoint(output / "checkpoints" / "model_0000003.pth", marker)
    (output / "checkpoints" / "last_checkpoint").write_text(checkpoint.name)
    opts = tiny_overrides(shapes_root, output)
    result = run_tool(["tools/train.py", "--config", QUICKSTART, "--resume", "--opts", *opts])
    _assert_refused_checkpoint(result, marker, checkpoint)
    assert not (output / "checkpoints" / "model_final.pth").exists()


def test_malicious_checkpoint_through_model_weights(tmp_path: Path, shapes_root: Path) -> None:
    marker = tmp_path / "pickle_ran"
    checkpoint = _malicious_checkpoint(tmp_path / "evil.pth", marker)
    opts = [*tiny_overrides(shapes_root, tmp_path / "run"), f"model.weights={checkpoint}"]
    result = run_tool(["tools/train.py", "--config", QUICKSTART, "--opts", *opts])
    _assert_refused_checkpoint(result, marker, checkpoint)


@pytest.mark.parametrize("where", ["file", "opts"])
def test_yaml_python_tag_is_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "yaml_ran"
    config = tmp_path / "config.yaml"
    seed = _yaml_payload(marker) if where == "file" else "0"
    config.write_text(f"_base_: {ROOT / QUICKSTART}\nseed: {seed}\n")
    opts = ["--opts", f"seed={_yaml_payload(marker)}"] if where == "opts" else []
    result = run_tool(["tools/train.py", "--config", str(config), *opts])
    assert result.returncode == 2
    assert "refused YAML tag '!!python/object/apply:os.mkdir'" in result.stderr
    assert (str(config) if where == "file" else "--opts") in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
