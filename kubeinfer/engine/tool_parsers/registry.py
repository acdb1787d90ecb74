"""Tool parsers by name (`--tool-call-parser NAME`): each parser is one module of this package that
decorates its class with `@register_tool_parser`."""
from __future__ import annotations

from kubeinfer.engine.parser_registry import ParserRegistry

_REGISTRY = ParserRegistry("kubeinfer.engine.tool_parsers", "tool call parser",
                           "--tool-call-parser", {"base", "stream", "partial_json"})
register_tool_parser = _REGISTRY.register
tool_parser_names = _REGISTRY.names
get_tool_parser = _REGISTRY.get
