"""The OpenAPI document, made to describe what the server really sends.

FastAPI's default says every route may answer 422 with its validation body (this server answers
400 with an OpenAI error body instead) and gives responses returned as `Response` objects an empty
schema. Here each route declares its real responses (`responses_for`), and `install_openapi`
drops FastAPI's 422s and adds the schemas that only streams use (the chunk models).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from kubeinfer.engine.server.response_models import (ChatCompletionChunk, CompletionChunk,
                                                     ErrorResponse)

_ERROR_TEXT = {
    400: "The request is invalid; `error.param` names the field and `error.message` says what "
         "to change.",
    401: "The server was started with an API key and the request did not carry it.",
    404: "The model named in the request is not served here.",
    500: "The server failed on this request (the details are in the server's log).",
    503: "The model is still loading or failed to load, the engine stopped, or the server is "
         "shutting down and the request did not finish in time (then with Retry-After).",
}

_SSE_TEXT = ("With `\"stream\": true`: server-sent events. Each `data:` line holds one {chunk} "
             "(#/components/schemas/{chunk}); an error after the stream began is one "
             "ErrorResponse event; the stream always ends with `data: [DONE]`.")


def responses_for(model: type[BaseModel] | None, *errors: int, stream_chunk: str | None = None,
                  media_type: str = "application/json") -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: its 200 (a model, or text for /metrics), an SSE alternative for
    routes that stream, and its error statuses, each with the OpenAI error body."""
    ok: dict[str, Any] = {"description": "OK"}
    if model is not None:
        ok["model"] = model
    else:
        ok["content"] = {media_type: {"schema": {"type": "string"}}}
    if stream_chunk is not None:
        ok["content"] = {"text/event-stream": {"schema": {
            "type": "string", "description": _SSE_TEXT.format(chunk=stream_chunk)}}}
    out: dict[int | str, dict[str, Any]] = {200: ok}
    for status in errors:
        out[status] = {"model": ErrorResponse, "description": _ERROR_TEXT[status]}
    return out


def install_openapi(app: FastAPI) -> None:
    """Replace `app.openapi` with the document above, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="OpenAI-compatible API of a kubeinfer engine, with vLLM's "
                                      "extra fields.")
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
                ok = operation.get("responses", {}).get("200", {})
                # a Response-returning route gets FastAPI's empty schema beside ours
                json_ok = ok.get("content", {}).get("application/json")
                if json_ok is not None and json_ok.get("schema") == {}:
                    ok["content"].pop("application/json")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for model in (ChatCompletionChunk, CompletionChunk):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas[model.__name__] = schema
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
