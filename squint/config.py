"""Typed settings read from the environment, one object per process.

Each process declares a frozen dataclass of its settings (nested dataclasses for groups)
and builds it once at the edge with :func:`load_settings`. A field ``cache.redis_url`` of
``VisionWorkerSettings`` loaded with prefix ``SQUINT_VISION_`` reads
``SQUINT_VISION_CACHE_REDIS_URL``. The same mapping feeds the Helm chart's documentation
(:func:`env_table`), so the chart and the loader cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """An environment variable holds a value its settings field cannot take."""


def _env_name(prefix: str, path: tuple[str, ...]) -> str:
    return prefix + "_".join(part.upper() for part in path)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parse(raw: str, tp: Any, name: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if optional and raw == "":
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
        if tp is Path:
            return Path(raw).expanduser()
        if origin is tuple:
            (item_type, _ellipsis) = typing.get_args(tp)
            items = [part.strip() for part in raw.split(",") if part.strip()]
            return tuple(_parse(item, item_type, name) for item in items)
        if origin is typing.Literal:
            allowed = typing.get_args(tp)
            if raw not in allowed:
                raise ValueError(f"expected one of {', '.join(map(str, allowed))}")
            return raw
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from None
    raise TypeError(f"settings field {name} has unsupported type {tp!r}")


def load_settings(
    cls: type[T],
    prefix: str,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from its defaults, then ``env`` (``os.environ`` by default), then ``overrides``.

    ``overrides`` are field values by dotted path (``{"grpc.port": 0}``), typically from the
    command line; a value of ``None`` means "not given" and leaves the field alone. Defaults
    are the class's own, nested defaults included (``field(default_factory=...)`` of the parent).
    """
    env = os.environ if env is None else env
    given = {path: value for path, value in (overrides or {}).items() if value is not None}
    return _apply(cls(), prefix, (), env, given)


def _apply(base: T, prefix: str, path: tuple[str, ...], env: Mapping[str, str], overrides: dict) -> T:
    cls = type(base)
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    for key in overrides:
        if key.split(".", 1)[0] not in names:
            raise TypeError(f"{cls.__name__} has no setting {'.'.join((*path, key))!r}")
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        field_path = (*path, field.name)
        if field.name in overrides:
            changes[field.name] = overrides[field.name]
        elif dataclasses.is_dataclass(tp):
            nested = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(field.name + ".")}
            changes[field.name] = _apply(getattr(base, field.name), prefix, field_path, env, nested)
        else:
            name = _env_name(prefix, field_path)
            if name in env:
                changes[field.name] = _parse(env[name], tp, name)
    return dataclasses.replace(base, **changes)


@dataclasses.dataclass(frozen=True)
class EnvVar:
    """One row of the settings table: the variable, the field it fills, its type and default."""

    name: str
    field: str
    type: str
    default: str
    help: str


def _type_name(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        name = f"list of {_type_name(typing.get_args(tp)[0])} (comma-separated)"
    elif origin is typing.Literal:
        name = " | ".join(map(str, typing.get_args(tp)))
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} (optional)" if optional else name


def env_table(cls: type, prefix: str) -> Iterator[EnvVar]:
    """Every environment variable ``cls`` reads, in declaration order, with its default."""
    yield from _env_rows(cls(), prefix, ())


def _env_rows(defaults: Any, prefix: str, path: tuple[str, ...]) -> Iterator[EnvVar]:
    hints = typing.get_type_hints(type(defaults))
    for field in dataclasses.fields(defaults):
        tp = hints[field.name]
        field_path = (*path, field.name)
        default = getattr(defaults, field.name)
        if dataclasses.is_dataclass(tp):
            yield from _env_rows(default, prefix, field_path)
            continue
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        yield EnvVar(
            name=_env_name(prefix, field_path),
            field=".".join(field_path),
            type=_type_name(tp),
            default="" if default is None else str(default),
            help=field.metadata.get("help", ""),
        )
