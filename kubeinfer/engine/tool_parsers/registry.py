"""Tool parsers by name (`--tool-call-parser NAME`).

Each parser is one module of this package that decorates its class with `@register_tool_parser`;
the modules are imported on the first lookup, so adding a parser is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from kubeinfer.engine.errors import ConfigError

_PARSERS: dict[str, type] = {}
_NOT_PARSERS = {"base", "registry", "stream", "partial_json"}
_loaded = False


def register_tool_parser(cls: type) -> type:
    if cls.name in _PARSERS and _PARSERS[cls.name] is not cls:
        raise ValueError(f"tool parser name {cls.name!r} is taken by {_PARSERS[cls.name].__name__}")
    _PARSERS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("kubeinfer.engine.tool_parsers")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_PARSERS:
            importlib.import_module(f"{package.__name__}.{info.name}")
    _loaded = True


def tool_parser_names() -> list[str]:
    _load_builtin()
    return sorted(_PARSERS)


def get_tool_parser(name: str) -> type:
    """The ToolParser class registered as `name`; ConfigError listing the names otherwise."""
    _load_builtin()
    if name not in _PARSERS:
        raise ConfigError(f"unknown tool call parser {name!r}; choose one of "
                          f"{', '.join(sorted(_PARSERS))} (--tool-call-parser)")
    return _PARSERS[name]
