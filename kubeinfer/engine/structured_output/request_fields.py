"""Request fields -> `StructuredOutputsParams`: OpenAI's `response_format`, vLLM's `structured_outputs`
and the older `guided_*` fields.

The server passes the request body as plain data (`request.model_dump()` or the JSON dict); the
offline API passes `SamplingParams(structured_outputs=...)` as a dict or a `StructuredOutputsParams`
and calls `coerce`. Every mistake is a `RequestError` whose `param` names the field.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.structured_output.params import KINDS, StructuredOutputsParams

# vLLM's pre-0.10 names -> the StructuredOutputsParams field each sets.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_OPTION_FIELDS = ("disable_any_whitespace", "max_whitespace_run")
# Fields vLLM accepts in structured_outputs that only choose among its backends; we have one.
_IGNORED_FIELDS = ("disable_fallback", "disable_additional_properties", "whitespace_pattern",
                   "backend", "_backend", "_backend_was_auto")


def from_request(body: Mapping[str, Any]) -> StructuredOutputsParams | None:
    """The constraint a chat or completion request asks for, or None.

    At most one source may be used: `structured_outputs`, one `guided_*` field, or a
    `response_format` other than text. `guided_whitespace_pattern`/`guided_decoding_backend` are
    accepted and ignored, as vLLM's later versions do.
    """
    found: list[tuple[str, StructuredOutputsParams]] = []
    if body.get("structured_outputs") is not None:
        found.append(("structured_outputs", coerce(body["structured_outputs"])))
    guided = [name for name in GUIDED_FIELDS if body.get(name) is not None]
    for name in guided:
        found.append((name, StructuredOutputsParams(**{GUIDED_FIELDS[name]: _as_choice(
            name, body[name]) if name == "guided_choice" else body[name]}, param=name)))
    if body.get("response_format") is not None:
        params = from_response_format(body["response_format"])
        if params is not None:
            found.append(("response_format", params))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise RequestError(f"set only one of {names}: each constrains the whole output", found[1][0])
    return found[0][1] if found else None


def coerce(value: Any, param: str = "structured_outputs") -> StructuredOutputsParams:
    """A dict with vLLM's field names (or a ready StructuredOutputsParams) -> StructuredOutputsParams."""
    if isinstance(value, StructuredOutputsParams):
        return value
    if not isinstance(value, Mapping):
        raise RequestError(f"{param} must be an object with one of {', '.join(KINDS)}, got "
                           f"{type(value).__name__}", param)
    known = set(KINDS) | set(_OPTION_FIELDS) | set(_IGNORED_FIELDS)
    unknown = sorted(k for k in value if k not in known)
    if unknown:
        raise RequestError(f"{param} has unknown field(s) {', '.join(unknown)}; the fields are "
                           f"{', '.join(KINDS + _OPTION_FIELDS)}", param)
    kwargs = {k: value[k] for k in KINDS + _OPTION_FIELDS if value.get(k) is not None}
    if "choice" in kwargs:
        kwargs["choice"] = _as_choice(f"{param}.choice", kwargs["choice"])
    if "disable_any_whitespace" in kwargs and not isinstance(kwargs["disable_any_whitespace"], bool):
        raise RequestError(f"{param}.disable_any_whitespace must be true or false", param)
    return StructuredOutputsParams(**kwargs, param=param)


def from_response_format(response_format: Any) -> StructuredOutputsParams | None:
    """OpenAI's `response_format`: text (None), json_object, json_schema; and vLLM's structural_tag."""
    param = "response_format"
    if not isinstance(response_format, Mapping):
        raise RequestError(f"{param} must be an object such as {{\"type\": \"json_object\"}}", param)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True, param=param)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise RequestError('response_format of type json_schema needs a "json_schema" object: '
                               '{"name": ..., "schema": {...}}', "response_format.json_schema")
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            # OpenAI allows a json_schema without a schema; any object is what it then means.
            return StructuredOutputsParams(json_object=True, param=param)
        return StructuredOutputsParams(json=schema, param="response_format.json_schema.schema")
    if kind == "structural_tag":
        return StructuredOutputsParams(structural_tag=json.dumps(dict(response_format), sort_keys=True),
                                       param=param)
    raise RequestError(f"response_format.type must be one of text, json_object, json_schema, "
                       f"structural_tag; got {kind!r}", "response_format.type")


def _as_choice(param: str, value: Any) -> Any:
    # A list arrives as a list from JSON; keep other types so the dataclass can name them in its error.
    return tuple(value) if isinstance(value, list) else value
