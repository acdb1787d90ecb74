"""`tool_choice` -> the JSON-schema constraint that forces a tool call (as vLLM does).

- `"none"`, `"auto"` or absent: no constraint (with "auto" a tool parser reads the output).
- `{"type": "function", "function": {"name": N}}`: the output is N's arguments, so the schema is
  N's `parameters`; the server wraps the whole output as one call of N.
- `"required"`: the output is a JSON array of at least one `{"name": ..., "parameters": {...}}`,
  each item one of the tools (an anyOf over them); the server turns each item into a call.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.structured_output.params import StructuredOutputsParams

_ANY_OBJECT = {"type": "object"}


def tool_choice_params(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any
                       ) -> StructuredOutputsParams | None:
    """The constraint for `tool_choice` over `tools` (OpenAI shapes, as plain data), or None."""
    if tool_choice in (None, "none", "auto"):
        return None
    functions = _functions(tools)
    if tool_choice == "required":
        if not functions:
            raise RequestError('tool_choice "required" needs at least one tool in "tools"',
                               "tool_choice")
        return StructuredOutputsParams(json=required_schema(functions), param="tool_choice")
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise RequestError('tool_choice {"type": "function"} needs "function": {"name": ...}',
                               "tool_choice")
        if name not in functions:
            known = ", ".join(functions) or "none"
            raise RequestError(f"tool_choice names function {name!r}, which is not in tools "
                               f"(tools: {known})", "tool_choice")
        return StructuredOutputsParams(json=functions[name], param="tool_choice")
    raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                       f'"function": {{"name": ...}}}}; got {tool_choice!r}', "tool_choice")


def required_schema(functions: Mapping[str, dict]) -> dict:
    """An array of one or more calls, each item naming one tool and carrying its parameters."""
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
              "required": ["name", "parameters"]}
             for name, params in functions.items()]
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}


def _functions(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict]:
    """name -> parameters schema (any object when the tool gives none)."""
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools or ()):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                               f"{{\"name\": ..., \"parameters\": {{...}}}}}}", f"tools[{i}]")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object",
                               f"tools[{i}]")
        functions[fn["name"]] = dict(params) if params else dict(_ANY_OBJECT)
    return functions
