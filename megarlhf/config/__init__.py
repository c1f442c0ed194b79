"""Typed configuration: frozen dataclasses, YAML files, dotted overrides, validation."""

from megarlhf.config.load import ConfigLoadError, load_config, to_dict, to_yaml
from megarlhf.config.model import (PRESETS, RUNTIME_FIELDS, ModelConfig, RopeScaling, RuntimeConfig,
                                   padded_vocab_size, preset, with_runtime_of)
from megarlhf.config.parallel import ParallelConfig
from megarlhf.config.validate import (ConfigError, check_layout, check_model, parallel_problems, range_problems,
                                      runtime_problems, shared_process_problems)

__all__ = [
    "ConfigError", "ConfigLoadError", "ModelConfig", "ParallelConfig", "PRESETS", "RopeScaling", "RuntimeConfig",
    "check_layout", "check_model", "load_config", "padded_vocab_size",
    "parallel_problems", "preset", "range_problems", "runtime_problems", "to_dict", "to_yaml",
    "RUNTIME_FIELDS", "shared_process_problems", "with_runtime_of",
]
