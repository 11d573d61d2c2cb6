"""Config mistakes through tools/train.py (issue 4, test 6).

A misspelled key, a wrong type and an out-of-range value, written in a config file and given with
--opts: each ends the tool with status 2 and one message naming the key, where it was set, and
(for a misspelling) the closest valid key; no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tooling import ROOT, run_tool

QUICKSTART = "configs/quickstart.yaml"

# (key, value, words the message must hold)
MISTAKES = {
    "misspelled": (
        "solver.base_lrr",
        "0.1",
        ["unknown key 'solver.base_lrr'", "did you mean 'solver.base_lr'?"],
    ),
    "wrong type": ("solver.max_iter", "many", ["'solver.max_iter'", "expected int", "'many'"]),
    "out of range": ("solver.base_lr", "-1", ["'solver.base_lr'", "must be > 0", "-1"]),
}


def _as_yaml(key: str, value: str) -> str:
    section, name = key.split(".")
    return f"{section}:\n  {name}: {value}\n"


@pytest.mark.parametrize("where", ["file", "opts"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_config_mistake_is_named(tmp_path: Path, mistake: str, where: str) -> None:
    key, value, words = MISTAKES[mistake]
    if where == "file":
        config = tmp_path / "config.yaml"
        config.write_text(f"_base_: {ROOT / QUICKSTART}\n{_as_yaml(key, value)}")
        args, source = ["--config", str(config)], str(config)
    else:
        args, source = ["--config", QUICKSTART, "--opts", f"{key}={value}"], "--opts"
    result = run_tool(["tools/train.py", *args, "--output-dir", str(tmp_path / "run")])
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for word in [*words, source]:
        assert word in message, (word, message)
    assert not (tmp_path / "run").exists()
