"""Typed configs: dataclasses filled from YAML files plus dotted command-line overrides.

Every script's behaviour is its config file plus overrides such as ``train.lr=1e-4``. Values are
checked against the dataclass field types while loading, so a typo'd key or a string where a number
belongs fails at start-up with a message naming the dotted key, not an hour into a run. The fully
resolved config is written next to each run's outputs (:func:`save_config`) so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fashionshoot.errors import ConfigError

T = TypeVar("T")

RESOLVED_CONFIG_NAME = "config.yaml"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` (recursively), converting where lossless (int -> float)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _field_types(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, vars(module) if module else None)


def _unknown_keys(prefix: str, unknown: Sequence[str], names: set[str]) -> ConfigError:
    return ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                       f"valid keys here: {', '.join(prefix + n for n in sorted(names))}")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and checking types."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise _unknown_keys(prefix, unknown, names)
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists, so it dumps as clean YAML)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str, cls: type | None = None) -> tuple[str, Any]:
    """Split ``key.sub=value``; the value is parsed as YAML (``3`` -> int, ``[1,2]`` -> list).

    With config ``cls``, a value for a plain string field (a prompt, a path) or one of a string choice's
    values (``mixed_precision=no``) is kept as typed unless it is quoted YAML: YAML would cut ``look #3
    on a rooftop`` at the ``#`` (a comment) and read ``no`` as ``False``. The key and value are checked
    against ``cls`` here, so an error names the override rather than the config file it overrides."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        return key, _override_value(raw, _field_type(cls, key) if cls is not None else Any, key)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from override {text!r})") from None


def _override_value(raw: str, tp: Any, key: str) -> Any:
    """The value of override ``key=raw`` for a field of type ``tp``, checked against it."""
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if not quoted and (tp is str or (typing.get_origin(tp) is typing.Literal and raw in typing.get_args(tp))):
        return raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({exc})") from exc
    _coerce(value, tp, key)
    return value


def _field_type(cls: type, dotted: str) -> Any:
    """The declared type of dotted key ``dotted`` in config dataclass ``cls`` (``Any`` inside a mapping
    field such as ``data.slot_map``); a key the dataclasses do not have is refused."""
    tp: Any = cls
    prefix = ""
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return Any
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        if part not in names:
            raise _unknown_keys(prefix, [part], names)
        tp, prefix = _field_types(tp)[part], f"{prefix}{part}."
    return tp


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Build config ``cls`` from defaults, then the YAML file at ``path``, then dotted ``overrides``."""
    tree = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        _merge(tree, loaded)
    for text in overrides:
        key, value = parse_override(text, cls)
        _set_dotted(tree, key, value)
    try:
        return _build(cls, tree)
    except ConfigError as exc:  # each override was checked alone: this is the file's, or the combination's
        where = "" if path is None else f" (from {path}{' and the overrides' if overrides else ''})"
        raise ConfigError(f"{exc}{where}") from None


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def save_config(config: Any, out_dir: str | Path) -> Path:
    """Write the resolved config as ``config.yaml`` in ``out_dir`` and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESOLVED_CONFIG_NAME
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


def config_from_argv(cls: type[T], argv: Sequence[str], default_path: str | Path | None = None) -> T:
    """Parse ``[--config FILE] [key=value ...]`` the way every script and CLI command does."""
    argv = list(argv)
    path: str | Path | None = default_path
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        path = argv[i + 1]
        del argv[i : i + 2]
    return load_config(cls, path, argv)
