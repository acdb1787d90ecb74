"""Reasoning parsers by name (`--reasoning-parser NAME`): each parser is one module of this package
that decorates its class with `@register_reasoning_parser`."""
from __future__ import annotations

from kubeinfer.engine.parser_registry import ParserRegistry

_REGISTRY = ParserRegistry("kubeinfer.engine.reasoning", "reasoning parser", "--reasoning-parser",
                           {"base", "stream"})
register_reasoning_parser = _REGISTRY.register
reasoning_parser_names = _REGISTRY.names
get_reasoning_parser = _REGISTRY.get
