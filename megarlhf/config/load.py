"""YAML + dotted ``key=value`` overrides -> typed, frozen config dataclasses (OmegaConf).

    cfg = load_config(PPOConfig, "examples/tiny/ppo.yaml", ["actor.parallel.tensor_model_parallel_size=2"])

Unknown keys and wrongly typed values are errors naming the key. A ``preset`` key inside
any :class:`ModelConfig` node expands to that preset's fields before the node's own
fields (and overrides) are applied.

Config files are data: YAML is read with a safe loader (a ``!!python/...`` tag is an
error, never a call), the top level must be a mapping, and ``${...}`` interpolations
resolve only to other keys and OmegaConf's built-in resolvers (``oc.env`` ...).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml
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
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigLoadError(f"{path}.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
        raw = {**PRESETS[name], **raw}
    hints = typing.get_type_hints(schema)
    out = dict(raw)
    for f in dataclasses.fields(schema):
        if f.name in out:
            sub = _unwrap_optional(hints[f.name])
            out[f.name] = _expand_presets(sub, out[f.name], f"{path}.{f.name}" if path else f.name)
    return out


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _shape_problem(tp: Any, raw: Any, path: str) -> Optional[str]:
    """The first key of ``raw`` unknown to ``tp`` or of the wrong container kind, named by
    its full dotted path (OmegaConf's own errors lose the path inside lists)."""
    tp = _unwrap_optional(tp)
    if raw is None:
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(raw, dict):
            return f"key {path!r}: expected a mapping of {tp.__name__} fields, got {_kind(raw)}"
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        for k, v in raw.items():
            key = f"{path}.{k}" if path else str(k)
            if k not in names:
                return f"key {key!r}: unknown key (known keys of {tp.__name__}: {', '.join(names)})"
            problem = _shape_problem(hints[k], v, key)
            if problem:
                return problem
    elif typing.get_origin(tp) is list:
        if not isinstance(raw, list):
            return f"key {path!r}: expected a list, got {_kind(raw)}"
        (item,) = typing.get_args(tp) or (Any,)
        for i, v in enumerate(raw):
            problem = _shape_problem(item, v, f"{path}[{i}]")
            if problem:
                return problem
    elif tp in (int, float, str, bool) and isinstance(raw, (dict, list)):
        return f"key {path!r}: expected {tp.__name__}, got {_kind(raw)}"
    return None


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


_PYTHON_TAG = "tag:yaml.org,2002:python/"


def _check_yaml(path: str) -> None:
    """Parse ``path``'s structure only (nothing is constructed or called) and refuse
    Python-object tags and a top level that is not a mapping."""
    with open(path, encoding="utf-8") as f:
        root = yaml.compose(f, Loader=yaml.SafeLoader)
    seen, stack = set(), [root] if root is not None else []
    while stack:  # aliases share nodes: each is visited once
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag.startswith(_PYTHON_TAG):
            raise ConfigLoadError(f"{path}: line {node.start_mark.line + 1}: the YAML tag "
                                  f"!!{node.tag[len('tag:yaml.org,2002:'):]} is not allowed (a config "
                                  "file holds data, never Python objects)")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(x for kv in node.value for x in kv)
    if root is None or isinstance(root, yaml.MappingNode):
        return
    if isinstance(root, yaml.ScalarNode):
        if root.tag == "tag:yaml.org,2002:null":
            return
        got = f"the scalar {root.value[:80]!r}"
    else:
        got = "a list"
    raise ConfigLoadError(f"{path}: expected a mapping of config keys at the top level, got {got}")


def _first_line(e: Exception) -> str:
    return str(e).strip().split("\n")[0]


def load_config(schema: Type[T], path: Optional[str] = None, overrides: Sequence[str] = (),
                base: Optional[Dict[str, Any]] = None) -> T:
    """Read ``path`` (YAML) and dotted ``overrides`` into a frozen ``schema`` instance."""
    raw = OmegaConf.create(base or {})
    where = f" ({path})" if path else ""
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigLoadError(f"config file not found: {path}")
        try:
            _check_yaml(path)
            loaded = OmegaConf.load(path)
        except ConfigLoadError:
            raise
        except Exception as e:  # yaml errors carry line numbers
            raise ConfigLoadError(f"{path}: cannot read YAML: {e}") from e
        if not isinstance(loaded, DictConfig):
            raise ConfigLoadError(f"{path}: expected a mapping of config keys at the top level")
        try:
            raw = OmegaConf.merge(raw, loaded)
        except (OmegaConfBaseException, TypeError, ValueError) as e:
            raise ConfigLoadError(f"{path}: {_first_line(e)}") from e
    for item in overrides:
        if "=" not in item:
            raise ConfigLoadError(f"override {item!r}: expected key=value")
        try:  # one at a time, so that an error names its override
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError, TypeError, ValueError) as e:
            raise ConfigLoadError(f"override {item!r}: {_first_line(e)}") from e
        except Exception as e:  # OmegaConf's key parser fails in other ways on odd keys
            raise ConfigLoadError(f"override {item!r}: not a valid dotted key "
                                  f"({type(e).__name__}: {_first_line(e)})") from e
    try:
        plain = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as e:  # ${oc.env:UNSET}, ${no.such.key} ...
        key = getattr(e, "full_key", None)
        raise ConfigLoadError(f"config{where}: key {key!r}: cannot resolve the interpolation: "
                              f"{_first_line(e)}") from e
    try:
        plain = _expand_presets(schema, plain, "")
    except ConfigLoadError as e:
        raise ConfigLoadError(f"config{where}: {e}") from None
    problem = _shape_problem(schema, plain, "")
    if problem:
        raise ConfigLoadError(f"config{where}: {problem}")
    structured = OmegaConf.structured(schema)
    OmegaConf.set_readonly(structured, False)
    try:
        merged = OmegaConf.merge(structured, plain)
        obj = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        key = getattr(e, "full_key", None)
        msg = str(e).split("\n")[0]
        raise ConfigLoadError(f"config{where}: key {key!r}: {msg}" if key else
                              f"config{where}: {msg}") from e
    return obj  # type: ignore[return-value]


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
