"""Every shipped config loads, validates and builds its model; torchvision ImageNet weights are not
on CI machines, so the pretrained path is cleared for the build."""

from __future__ import annotations

from pathlib import Path

import pytest

from frcnn.build import build_model
from frcnn.config import ConfigError, load_config, with_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_are_found() -> None:
    assert len(CONFIGS) >= 7


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_builds(path: Path) -> None:
    cfg = load_config(path)
    cfg = with_overrides(cfg, ["model.backbone.pretrained="])
    model = build_model(cfg.model)
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.out_features == cfg.model.num_classes + 1


def test_misspelled_key_names_the_closest_valid_key(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text(f"_base_: {CONFIGS[0]}\nsolver:\n  base_lrr: 0.01\n")
    with pytest.raises(ConfigError, match="did you mean 'solver.base_lr'"):
        load_config(config)


def test_size_divisibility_must_be_a_multiple_of_32() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        with_overrides(load_config(CONFIGS[0]), ["model.size_divisibility=16"])
