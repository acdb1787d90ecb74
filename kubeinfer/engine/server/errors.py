"""OpenAI-shaped errors: every failure a client sees is `{"error": {message, type, param, code}}`.

vLLM and OpenAI clients read `error.message`; the `openai` package maps the status code to its
exception class (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, ...).
"""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubeinfer.engine.errors import EngineDeadError, RequestError, RequestFailedError
from kubeinfer.engine.sampling_params import SamplingParamsError
from kubeinfer.engine.server.drain import CUT_MESSAGE, RETRY_AFTER_S, DrainExpired

logger = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


# What a client reads when the engine failed on its request: the exception's own text may name
# internals (paths, tensor shapes), so it goes to the log only.
REQUEST_FAILED_MESSAGE = "The server had an error while processing your request."


class APIError(Exception):
    """An error with the HTTP status and OpenAI error body it should become."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type or _TYPES.get(status, "APIError")
        self.headers = headers


def error_body(message: str, status: int, param: str | None = None,
               type: str | None = None) -> dict:
    err = APIError(message, status, param, type)
    return {"error": {"message": err.message, "type": err.type, "param": err.param,
                      "code": err.status}}


def error_response(message: str, status: int, param: str | None = None,
                   type: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, type), status_code=status,
                        headers=headers)


def model_not_found(model: str) -> APIError:
    return APIError(f"The model `{model}` does not exist.", 404, param="model")


def _loc_to_param(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic puts the union member's type in the location ("prompt.str"); the user never wrote it
    parts = [p for p in parts if not p.startswith(("list[", "function-"))
             and p not in ("str", "int", "float", "bool", "dict[str,any]")]
    return ".".join(parts)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for a pydantic failure: which field, what was wrong, what was sent."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"The request body is not valid JSON: {ctx.get('error', first.get('msg'))}.", None
    lines = []
    param = None
    seen = set()
    for e in errors:
        field = _loc_to_param(tuple(e.get("loc", ())))
        if param is None and field:
            param = field
        msg = str(e.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        key = (field, msg)
        if key in seen:
            continue
        seen.add(key)
        if e.get("type") == "model_attributes_type" or not field:
            lines.append(f"The request body must be a JSON object: {msg}")
            continue
        got = e.get("input")
        shown = "" if e.get("type") == "missing" else f" (got {got!r})"
        if len(shown) > 120:
            shown = shown[:117] + "...)"
        lines.append(f"{field}: {msg}{shown}")
        if len(lines) == 3:
            break
    return "; ".join(lines), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.message, exc.status, exc.param, exc.type, exc.headers)

    # The engine's per-request errors are the client's to fix: 400 with the engine's words.
    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(str(exc.args[0] if exc.args else exc), 400, exc.param)

    @app.exception_handler(RequestFailedError)
    async def _request_failed(request: Request, exc: RequestFailedError) -> JSONResponse:
        logger.error("%s %s failed in the engine: %s", request.method, request.url.path, exc)
        return error_response(REQUEST_FAILED_MESSAGE, 500)

    @app.exception_handler(DrainExpired)
    async def _drain_expired(_: Request, exc: DrainExpired) -> JSONResponse:
        return error_response(CUT_MESSAGE, 503, headers={"Retry-After": str(RETRY_AFTER_S)})

    # A dead engine loop: the liveness probe restarts the pod.
    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(str(exc), 503)

    @app.exception_handler(SamplingParamsError)
    async def _sampling_error(_: Request, exc: SamplingParamsError) -> JSONResponse:
        return error_response(str(exc), 400, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(detail, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log, never to the client.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(REQUEST_FAILED_MESSAGE, 500)
