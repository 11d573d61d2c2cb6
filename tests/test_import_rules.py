"""The dependency direction of DESIGN.md, checked on the source so it cannot rot:
tools -> build -> {config, modeling, datasets, evaluation, engine} -> structures."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "frcnn"

# what each package may import from frcnn (itself always allowed)
ALLOWED = {
    "structures": set(),
    "config": set(),
    "modeling": {"structures"},
    "datasets": {"structures"},
    "evaluation": {"structures"},
    "engine": {"structures"},
}
# third-party modules a package must not touch
FORBIDDEN_THIRD_PARTY = {
    "modeling": {"yaml", "pycocotools"},
    "structures": {"yaml", "pycocotools"},
    "config": {"torch", "torchvision"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_the_dependency_direction(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files
    violations = []
    for path in files:
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "frcnn" and len(parts) > 1:
                target = parts[1]
                if target != package and target not in ALLOWED[package]:
                    violations.append(f"{path.relative_to(PACKAGE)} imports {name}")
            elif parts[0] in FORBIDDEN_THIRD_PARTY.get(package, set()):
                violations.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not violations, "\n".join(violations)


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from frcnn.config import load_config\nimport yaml\n")
    assert _imports(bad) == {"frcnn.config", "yaml"}
