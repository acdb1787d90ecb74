"""The router's own answers in OpenAI's error shape: `{"error": {message, type, param, code}}`.

The router does not import the engine's server (it would pull in torch); the shape is the same.
"""
from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
          413: "RequestTooLargeError", 502: "BadGatewayError", 503: "ServiceUnavailableError"}


def error_response(message: str, status: int, *, param: str | None = None,
                   retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": {"message": message, "type": _TYPES.get(status, "APIError"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)
