"""tools/benchmark.py end to end at tiny settings: every row present, finite and positive. It
times nothing itself: no speed is asserted here."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "benchmark.py"
TIME_ROWS = [
    "train step",
    "inference per image",
    "anchor-target",
    "proposal layer",
    "proposal-target",
    "post-processing",
]
SYNC_ROWS = ["host syncs / step, batch 2", "host syncs / step, batch 4"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("frcnn_benchmark_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(TOOL), "--arch", "quickstart", "--batch", "2", "--size", "96"]
    command += ["--iters", "1", "--warmup", "0", "--gt-boxes", "3", "--no-memory"]
    command += ["--stage-iters", "2", "--sync-batches", "2,4"]
    # two threads: NMS runs one call per thread's range of images, so the count is fixed from
    # batch 2 on whatever this machine's core count
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [*command, "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == TIME_ROWS + SYNC_ROWS
    for name in SYNC_ROWS:
        assert rows[name]["unit"] == "calls"
        assert rows[name]["frcnn"] < rows[name]["torchvision"]
    assert rows[SYNC_ROWS[0]]["frcnn"] == rows[SYNC_ROWS[1]]["frcnn"]
    for name, row in rows.items():
        assert row["unit"] in ("s", "ms", "calls")
        for key in ("frcnn", "torchvision", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["ratio"] == pytest.approx(row["frcnn"] / row["torchvision"])
    assert result["hardware"]["cpu_count"] >= 1
    assert result["torch"] and result["torchvision"]
    assert result["config"]["batch"] == 2 and result["config"]["size"] == 96
    assert result["config"]["stage_iters"] == 2
    assert "model.rpn.objectness=sigmoid" in result["config"]["overrides"]
    for name in TIME_ROWS:
        assert name in done.stdout  # the printed table


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--batch", "0"], "--batch"),
        (["--size", "8"], "--size"),
        (["--iters", "0"], "--iters"),
        (["--stage-iters", "0"], "--stage-iters"),
        (["--gt-boxes", "-1"], "--gt-boxes"),
        (["--arch", "vgg"], "--arch"),
        (["--amp", "fp8"], "--amp"),
        (["--json", "/no/such/folder/out.json"], "--json"),
        (["--sync-batches", "2,x"], "--sync-batches"),
        (["--sync-batches", "0"], "--sync-batches"),
        (["--arch", "quickstart", "--fold-bn"], "--fold-bn"),  # its batch norm trains
    ],
)
def test_bad_arguments_name_the_flag(argv: list[str], flag: str, capsys) -> None:
    tool = _load_tool()
    with pytest.raises(SystemExit) as error:
        tool.parse_args(argv)
    assert error.value.code == 2
    assert flag in capsys.readouterr().err


def test_scale_study_runs_every_point(tmp_path: Path) -> None:
    out, table = tmp_path / "scale.json", tmp_path / "scale.md"
    command = [sys.executable, str(ROOT / "tools" / "scale_study.py"), "--sizes", "64,96"]
    command += ["--gt-boxes", "1,3", "--batches", "1", "--base-size", "64", "--base-gt", "2"]
    command += ["--base-batch", "1", "--iters", "1", "--warmup", "0", "--no-memory"]
    command += ["--json", str(out), "--markdown", str(table)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["axis"], r["value"]) for r in rows] == [
        ("image size", 64),
        ("image size", 96),
        ("gt boxes", 1),
        ("gt boxes", 3),
        ("batch", 1),
    ]
    for row in rows:
        assert row["step_frcnn"] > 0 and row["step_torchvision"] > 0
    assert table.read_text().count("\n") == 2 + len(rows)


@pytest.mark.parametrize("malloc", ["fixed", "default"])
def test_memory_processes_get_the_malloc_setting(malloc: str, monkeypatch) -> None:
    tool = _load_tool()
    argv = ["--arch", "quickstart", "--batch", "1", "--size", "64", "--malloc", malloc]
    seen = []

    def fake_run(command, env, **kwargs):
        seen.append((command[-1], env.get("MALLOC_MMAP_THRESHOLD_")))
        return subprocess.CompletedProcess(command, 0, stdout='{"peak_mb": 5.0}\n', stderr="")

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(tool.subprocess, "run", fake_run)
    peaks = tool.measure_memory(tool.parse_args(argv), argv, {}, tool.torch.device("cpu"))
    assert peaks == {"frcnn": 5.0, "torchvision": 5.0}
    threshold = str(tool.MMAP_THRESHOLD) if malloc == "fixed" else None
    assert seen == [("frcnn", threshold), ("torchvision", threshold)]


def test_a_memory_process_reports_its_peak() -> None:
    command = [sys.executable, str(TOOL), "--arch", "quickstart", "--batch", "1", "--size", "64"]
    command += ["--warmup", "0", "--_memory-only", "frcnn"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    assert 0 < peak < 2000
