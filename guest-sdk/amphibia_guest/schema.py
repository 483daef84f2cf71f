"""Plain Python types as JSON schemas, and parsed JSON back as values of those types.

`llm.chat(messages, schema=Person)` sends `json_schema_of(Person)` to the host, which constrains the
model's output to it, and gives back `out.value`, built by `value_of(Person, parsed)`. Supported: str,
int, float, bool, None, list[X], tuple[X, ...], dict[str, X], X | None and unions, Literal[...],
Enum subclasses, dataclasses and TypedDicts (nested freely), or a JSON schema dict as it is.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

_PRIMITIVES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def json_schema_of(tp: Any) -> dict:
    """The JSON schema of `tp` (a dict is taken as a schema already)."""
    if isinstance(tp, dict):
        return tp
    return _schema(tp, set())


def _schema(tp: Any, seen: set) -> dict:
    if tp is Any:
        return {}
    if tp in _PRIMITIVES:
        return {"type": _PRIMITIVES[tp]}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _schema(args[0], seen)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [_schema(a, seen) for a in args]
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin in (list, typing.List, set, frozenset) or tp in (list, set, frozenset):
        return {"type": "array", "items": _schema(args[0], seen)} if args else {"type": "array"}
    if origin is tuple or tp is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema(args[0], seen)}
        return {"type": "array", "prefixItems": [_schema(a, seen) for a in args], "minItems": len(args),
                "maxItems": len(args)} if args else {"type": "array"}
    if origin is dict or tp is dict:
        return {"type": "object", "additionalProperties": _schema(args[1], seen)} if args else {"type": "object"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)):
        if tp in seen:
            raise TypeError(f"{tp.__name__} refers to itself: recursive types cannot be a schema here")
        seen = seen | {tp}
        hints = typing.get_type_hints(tp)
        if dataclasses.is_dataclass(tp):
            fields = [f for f in dataclasses.fields(tp) if f.init]
            names = [f.name for f in fields]
            required = [f.name for f in fields
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        else:
            names = list(hints)
            required = [n for n in names if n in tp.__required_keys__]
        return {"type": "object", "properties": {n: _schema(hints[n], seen) for n in names},
                "required": required, "additionalProperties": False}
    raise TypeError(f"cannot make a JSON schema of {tp!r}; use a dataclass, a TypedDict, a builtin type or a dict")


def value_of(tp: Any, data: Any) -> Any:
    """`data` (parsed JSON) as a value of `tp`: dataclasses and Enums are built, the rest is as parsed."""
    if isinstance(tp, dict) or tp is Any or data is None:
        return data
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return value_of(args[0], data)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is not type(None) and _fits(option, data):
                return value_of(option, data)
        return data
    if origin in (list, typing.List) and args and isinstance(data, list):
        return [value_of(args[0], v) for v in data]
    if origin is tuple and args and isinstance(data, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(value_of(args[0], v) for v in data)
        return tuple(value_of(a, v) for a, v in zip(args, data))
    if origin in (set, frozenset) and args and isinstance(data, list):
        return origin(value_of(args[0], v) for v in data)
    if origin is dict and args and isinstance(data, dict):
        return {k: value_of(args[1], v) for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(data, dict):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: value_of(hints[f.name], data[f.name])
                     for f in dataclasses.fields(tp) if f.init and f.name in data})
    if isinstance(tp, type) and typing.is_typeddict(tp) and isinstance(data, dict):
        hints = typing.get_type_hints(tp)
        return {k: value_of(hints.get(k, Any), v) for k, v in data.items()}
    return data


def _fits(tp: Any, data: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    if origin in _PRIMITIVES:
        return isinstance(data, origin) and not (origin is int and isinstance(data, bool))
    if origin in (list, tuple, set, frozenset):
        return isinstance(data, list)
    if origin is dict or (isinstance(tp, type) and (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp))):
        return isinstance(data, dict)
    return True
