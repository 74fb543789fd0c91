"""Record shapes of tau2-bench's data models, as plain ordered dicts.

tau2 keeps its databases as pydantic models and answers with `json.dumps(model.model_dump())`:
fields in declaration order (inherited ones first), optional fields present as null, float
fields as floats, int fields as ints. `Models.build(name, value)` gives a record that shape, so
our JSON text equals tau2's. It checks what the tools' inputs could get wrong (missing fields,
wrong types, values outside a Literal) and raises ValueError naming the model and field; the
wording differs from pydantic's.

A field type is: str | int | float | bool | a model name | ("list", T) | ("dict", T) |
("opt", T) (default None) | ("lit", *values) (a str from a fixed set).
A union is {"by": discriminating field, value: model name}.
"""
from __future__ import annotations

from typing import Any

_MISSING = object()


class Models:
    def __init__(self, specs: dict[str, Any]):
        self.specs = specs

    def build(self, name: str, value: Any) -> Any:
        return self._check(name, value, name)

    def _check(self, kind: Any, value: Any, where: str) -> Any:
        if kind is str or kind is bool:
            if type(value) is not kind:
                raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
            return value
        if kind is int:
            if type(value) is float and value.is_integer():
                return int(value)
            if type(value) is not int:
                raise ValueError(f"{where}: expected int, got {value!r}")
            return value
        if kind is float:
            if type(value) not in (int, float):
                raise ValueError(f"{where}: expected float, got {value!r}")
            return float(value)
        if isinstance(kind, tuple):
            tag, *args = kind
            if tag == "opt":
                return None if value is None else self._check(args[0], value, where)
            if tag == "lit":
                if value not in args:
                    raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
                return value
            if tag == "list":
                if not isinstance(value, list):
                    raise ValueError(f"{where}: expected a list, got {value!r}")
                return [self._check(args[0], v, f"{where}.{i}") for i, v in enumerate(value)]
            if tag == "dict":
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: expected an object, got {value!r}")
                return {k: self._check(args[0], v, f"{where}.{k}") for k, v in value.items()}
        spec = self.specs[kind]
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object for {kind}, got {value!r}")
        if isinstance(spec, dict):  # a union, told apart by one field's value
            member = spec.get(value.get(spec["by"]))
            if member is None:
                raise ValueError(f"{where}: no {kind} has {spec['by']}={value.get(spec['by'])!r}")
            return self._check(member, value, where)
        out = {}
        for field, ftype in spec:
            item = value.get(field, _MISSING)
            if item is _MISSING:
                if not (isinstance(ftype, tuple) and ftype[0] == "opt"):
                    raise ValueError(f"validation error for {kind}: {field} is required")
                item = None
            out[field] = self._check(ftype, item, f"{kind}.{field}")
        return out
