"""The request-body check every route gets before FastAPI parses the body: strict JSON only.

Python's `json` accepts what JSON does not (`NaN`, `Infinity`; `1e400` becomes `inf`) and decodes
`"\\ud800"` into a lone UTF-16 surrogate, a `str` that cannot be encoded: the tokenizer, the chat
template or even the 404 body that echoes a model name then fails with a 500, and the keep-alive
connection is closed. One check at the edge turns all of them into a 400 that names the field,
whatever the route and whichever field the value hides in.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable

from fastapi import Request, Response
from fastapi.routing import APIRoute

from kubeinfer.engine.server.errors import APIError, error_response


def _path(parts: list) -> str:
    # a field name may be the invalid text itself: escaped, so the error body can be encoded
    return ".".join(str(p).encode("utf-8", "backslashreplace").decode("utf-8") for p in parts)


def check_value(value: Any) -> None:
    """Raise a 400 naming the first string that is not valid Unicode or float that is not finite.

    Iterative, so a deeply nested body cannot exhaust the stack here.
    """
    stack: list[tuple[Any, list]] = [(value, [])]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise APIError(f"{_path(where) or 'the body'}: numbers must be finite, got "
                               f"{'NaN' if math.isnan(item) else 'an infinity'} (JSON has no "
                               "NaN or Infinity, and a literal like 1e400 overflows a float).",
                               400, param=_path(where) or None)
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_text(k, where + [k])
                stack.append((v, where + [k]))
        elif isinstance(item, list):
            stack.extend((v, where + [i]) for i, v in enumerate(item))


def _check_text(text: str, where: list) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        field = _path(where) or "the body"
        raise APIError(f"{field}: the text is not valid Unicode (a lone UTF-16 surrogate "
                       f"{text[e.start]!r} at character {e.start}); send UTF-8 text, and "
                       "\\ud800-\\udfff escapes only as surrogate pairs.", 400,
                       param=_path(where) or None) from None


def parse_body(body: bytes) -> Any:
    """The body as JSON, or a 400 that says what is wrong with it."""
    try:
        value = json.loads(body)  # NaN and Infinity load as floats, which check_value refuses
    except UnicodeDecodeError as e:
        raise APIError(f"The request body is not valid UTF-8 (byte {e.start}).", 400) from None
    except json.JSONDecodeError as e:
        raise APIError(f"The request body is not valid JSON: {e.msg} (line {e.lineno}, column "
                       f"{e.colno}).", 400) from None
    except RecursionError:
        raise APIError("The request body is nested too deeply.", 400) from None
    except ValueError as e:  # an integer literal of more digits than Python converts
        raise APIError(f"The request body has a number that is too large: {e}.", 400) from None
    check_value(value)
    return value


class StrictJSONRoute(APIRoute):
    """An APIRoute that checks the JSON body (if any) with `parse_body` first."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                body = await request.body()  # cached: FastAPI reads it again from there
                if body:
                    try:
                        parse_body(body)
                    except APIError as e:
                        return error_response(e.message, e.status, e.param)
            return await handler(request)

        return checked
