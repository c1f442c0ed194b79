"""Typed configuration: frozen dataclasses, YAML files, dotted overrides, validation."""

from megarlhf.config.load import ConfigLoadError, load_config, to_dict, to_yaml
from megarlhf.config.model import PRESETS, ModelConfig, RopeScaling, padded_vocab_size, preset
from megarlhf.config.parallel import ParallelConfig
from megarlhf.config.validate import ConfigError, check_layout, check_model

__all__ = [
    "ConfigError", "ConfigLoadError", "ModelConfig", "ParallelConfig", "PRESETS", "RopeScaling",
    "check_layout", "check_model", "load_config", "padded_vocab_size", "preset", "to_dict",
    "to_yaml",
]
