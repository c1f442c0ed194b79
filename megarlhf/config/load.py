"""YAML + dotted ``key=value`` overrides -> typed, frozen config dataclasses (OmegaConf).

    cfg = load_config(PPOConfig, "examples/tiny/ppo.yaml", ["actor.parallel.tensor_model_parallel_size=2"])

Unknown keys and wrongly typed values are errors naming the key. A ``preset`` key inside
any :class:`ModelConfig` node expands to that preset's fields before the node's own
fields (and overrides) are applied.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megarlhf.config.model import PRESETS, ModelConfig

__all__ = ["load_config", "to_yaml", "to_dict", "ConfigLoadError"]

T = TypeVar("T")


class ConfigLoadError(ValueError):
    """A config file or override that cannot be read into the schema."""


def _expand_presets(schema: type, raw: Any, path: str) -> Any:
    """Replace ``{preset: name, **fields}`` in ModelConfig nodes by preset fields + fields."""
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(schema):
        return raw
    if schema is ModelConfig and raw.get("preset") is not None:
        name = raw["preset"]
        if name not in PRESETS:
            raise ConfigLoadError(f"{path}.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
        raw = {**PRESETS[name], **raw}
    hints = typing.get_type_hints(schema)
    out = dict(raw)
    for f in dataclasses.fields(schema):
        if f.name in out:
            sub = _unwrap_optional(hints[f.name])
            out[f.name] = _expand_presets(sub, out[f.name], f"{path}.{f.name}" if path else f.name)
    return out


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def load_config(schema: Type[T], path: Optional[str] = None, overrides: Sequence[str] = (),
                base: Optional[Dict[str, Any]] = None) -> T:
    """Read ``path`` (YAML) and dotted ``overrides`` into a frozen ``schema`` instance."""
    raw = OmegaConf.create(base or {})
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigLoadError(f"config file not found: {path}")
        try:
            raw = OmegaConf.merge(raw, OmegaConf.load(path))
        except Exception as e:  # yaml errors carry line numbers
            raise ConfigLoadError(f"{path}: cannot read YAML: {e}") from e
    for item in overrides:
        if "=" not in item:
            raise ConfigLoadError(f"override {item!r}: expected key=value")
    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigLoadError(f"overrides {list(overrides)}: {e}") from e
    plain = OmegaConf.to_container(raw, resolve=True)
    plain = _expand_presets(schema, plain, "")
    structured = OmegaConf.structured(schema)
    OmegaConf.set_readonly(structured, False)
    try:
        merged = OmegaConf.merge(structured, plain)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        where = f" ({path})" if path else ""
        key = getattr(e, "full_key", None)
        msg = str(e).split("\n")[0]
        raise ConfigLoadError(f"config{where}: key {key!r}: {msg}") from e
    return obj  # type: ignore[return-value]


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
