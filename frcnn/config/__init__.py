"""Typed, strict configuration: YAML files (``_base_``) and ``--opts`` -> frozen dataclasses."""

from __future__ import annotations

from frcnn.config.convert import ConfigError
from frcnn.config.loader import (
    config_to_dict,
    dump_config,
    load_config,
    validate,
    with_overrides,
)
from frcnn.config.schema import (
    AnchorConfig,
    BackboneConfig,
    Config,
    DataConfig,
    DatasetConfig,
    ModelConfig,
    ROIHeadsConfig,
    RPNConfig,
    ShapesConfig,
    SolverConfig,
    TestConfig,
)

__all__ = [
    "AnchorConfig",
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "ModelConfig",
    "ROIHeadsConfig",
    "RPNConfig",
    "ShapesConfig",
    "SolverConfig",
    "TestConfig",
    "config_to_dict",
    "dump_config",
    "load_config",
    "validate",
    "with_overrides",
]
