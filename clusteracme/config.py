"""Loading a daemon's TOML configuration into frozen dataclasses, once, at the edge.

Both daemons read ``--config FILE`` (TOML) and then apply ``--set
section.key=value`` overrides (the value is parsed as TOML, else taken as a
string). Unknown sections or keys are errors: a typo in a config file must
not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from clusteracme.errors import InvalidArgument

T = TypeVar("T")


def load_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path} is not valid TOML: {exc}") from exc


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise InvalidArgument(f"--set {item!r}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def build(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a dict, recursing into nested dataclasses."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(known)
    if unknown:
        raise InvalidArgument(f"unknown setting(s) in [{where or 'top level'}]: {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        label = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise InvalidArgument(f"[{label}] must be a table")
            kwargs[name] = build(hint, value, label)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(hint, value, label)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"bad settings in [{where or 'top level'}]: {exc}") from exc


def _coerce(hint: Any, value: Any, label: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Path:
        return Path(value)
    if origin is dict:  # a TOML table of scalars, e.g. {letsencrypt = 100}
        if not isinstance(value, dict):
            raise InvalidArgument(f"{label} must be a table")
        return {str(k): _coerce(args[1], v, f"{label}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise InvalidArgument(f"{label} must be a list")
        if dataclasses.is_dataclass(args[0]):  # [[section]] arrays of tables
            items = []
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise InvalidArgument(f"{label}[{index}] must be a table")
                items.append(build(args[0], item, f"{label}[{index}]"))
            return tuple(items)
        return tuple(_coerce(args[0], v, label) for v in value)
    if hint is float and isinstance(value, int):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise InvalidArgument(f"{label} must be {hint.__name__}, not {type(value).__name__}")
    return value
