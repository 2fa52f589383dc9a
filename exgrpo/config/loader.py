"""The config machinery: a command's frozen dataclass loaded from YAML, overridden on the command line with
``key=value`` (nested: ``model.hidden_size=128``), checked, and saved into the run folder."""
from __future__ import annotations

import dataclasses
import os
import types
import typing

import yaml


def _convert(name, tp, value):
    """Coerce a YAML/CLI value to the annotated field type, or raise ValueError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for a in args:
            try:
                return _convert(name, a, value)
            except ValueError:
                continue
        raise ValueError(f"config field {name!r}: cannot read {value!r} as {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config field {name!r}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin is tuple or tp is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {name!r}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else str
        return tuple(_convert(name, inner, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"config field {name!r}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"config field {name!r}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"config field {name!r}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ValueError(f"config field {name!r}: expected int, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"config field {name!r}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """cls from a mapping. A nested config given as a mapping starts from this class's default for that field (its
    default_factory's values, e.g. TrainConfig's loss defaults), not from the nested class's own defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(prefix + u for u in unknown)} for {cls.__name__}; "
                         f"known: {sorted(fields)}")
    kw = {}
    for k, v in data.items():
        f = fields[k]
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else f.default if f.default is not dataclasses.MISSING else None)
            if dataclasses.is_dataclass(default):
                v = _merge(to_dict(default), v)
        kw[k] = _convert(prefix + k, hints[k], v)
    return cls(**kw)


def to_dict(cfg) -> dict:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def parse_overrides(items) -> dict:
    """["a=1", "model.h=2"] -> {"a": "1", "model": {"h": "2"}} (values parsed as YAML scalars)."""
    out: dict = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"override {it!r} is not key=value")
        key, val = it.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(val) if val.strip() else ""
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | None = None, overrides=(), base: dict | None = None):
    """cls defaults <- base <- YAML file <- CLI overrides."""
    data = dict(base or {})
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config: no such file {path!r}")
        with open(path) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"--config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        data = _merge(data, loaded)
    data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save_config(cfg, folder: str, name: str = "config.yaml") -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
    return path
