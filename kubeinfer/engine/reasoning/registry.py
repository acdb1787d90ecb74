"""Reasoning parsers by name (`--reasoning-parser NAME`).

Each parser is one module of this package that decorates its class with
`@register_reasoning_parser`; the modules are imported on the first lookup, so adding a parser is
adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from kubeinfer.engine.errors import ConfigError

_PARSERS: dict[str, type] = {}
_NOT_PARSERS = {"base", "registry", "stream"}
_loaded = False


def register_reasoning_parser(cls: type) -> type:
    if cls.name in _PARSERS and _PARSERS[cls.name] is not cls:
        raise ValueError(f"reasoning parser name {cls.name!r} is taken by "
                         f"{_PARSERS[cls.name].__name__}")
    _PARSERS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("kubeinfer.engine.reasoning")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_PARSERS:
            importlib.import_module(f"{package.__name__}.{info.name}")
    _loaded = True


def reasoning_parser_names() -> list[str]:
    _load_builtin()
    return sorted(_PARSERS)


def get_reasoning_parser(name: str) -> type:
    """The ReasoningParser class registered as `name`; ConfigError listing the names otherwise."""
    _load_builtin()
    if name not in _PARSERS:
        raise ConfigError(f"unknown reasoning parser {name!r}; choose one of "
                          f"{', '.join(sorted(_PARSERS))} (--reasoning-parser)")
    return _PARSERS[name]
