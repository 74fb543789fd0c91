"""Small helpers for `configs/*.py`: `get_config("key=value,flag")` arguments."""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'algo=ppo,runlocal' -> ConfigDict(algo='ppo', runlocal=True, ...); values take the type
    of their default, unknown keys are an error (a typo must not silently do nothing)."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return ml_collections.ConfigDict(out)


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """get_config(arg) of another config file: configs build on each other by path (they are
    files passed to --config, not an importable package)."""
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
