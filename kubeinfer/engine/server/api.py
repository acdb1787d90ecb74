"""The OpenAI-compatible HTTP app: routes, their wiring, and the app's lifespan.

`build_app(state)` is all a caller needs; `kubeinfer serve` runs it under uvicorn, tests too.
Routes under /v1 plus /tokenize and /detokenize need the model and answer 503 while it loads;
/health says whether it has; /metrics and /version always answer.
"""
from __future__ import annotations

import contextlib
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubeinfer.engine.server.auth import APIKeyMiddleware
from kubeinfer.engine.server.errors import APIError, error_response, install_error_handlers
from kubeinfer.engine.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                              DetokenizeRequest, EmbeddingRequest,
                                              TokenizeRequest)
from kubeinfer.engine.server.serving_chat import create_chat_completion, render_chat
from kubeinfer.engine.server.serving_classification import (ClassificationRequest,
                                                            create_classification)
from kubeinfer.engine.server.serving_common import check_token_ids, now
from kubeinfer.engine.server.serving_completion import create_completion
from kubeinfer.engine.server.serving_embedding import create_embedding
from kubeinfer.engine.server.state import ServerState



def _need_tokenizer(engine: Any) -> None:
    if engine.tokenizer is None:
        raise APIError("this server was started with --skip-tokenizer-init and has no tokenizer "
                       "to (de)tokenize with; restart it without that flag.", 400)

def version() -> str:
    import kubeinfer

    v = getattr(kubeinfer, "__version__", None)
    if v:
        return v
    try:
        return metadata.version("kubeinfer")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def build_app(state: ServerState, allowed_origins: list[str] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        state.start_loading()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="kubeinfer", version=version(), lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    _install_engine_error_handler(app)
    app.add_middleware(JSONContentTypeMiddleware)
    if state.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key)
    if allowed_origins:  # added last, so outermost: a 401 still carries CORS headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])

    @app.get("/health")
    async def health() -> Response:
        if state.engine is not None and state.engine.is_alive():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"error": state.not_ready_reason()}, status_code=503)

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        engine = state.ready_engine()
        created = now()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "kubeinfer",
             "root": state.config.model.model, "parent": None,
             "max_model_len": engine.max_model_len} for name in state.served_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        engine = state.ready_engine()
        state.resolve_model(model_id)
        return {"id": model_id, "object": "model", "created": now(), "owned_by": "kubeinfer",
                "root": state.config.model.model, "parent": None,
                "max_model_len": engine.max_model_len}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(state, body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(state, body, raw)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, raw: Request) -> Response:
        return await create_embedding(state, body, raw)

    @app.post("/classify")
    @app.post("/v1/classify")  # vLLM serves /classify; SGLang /v1/classify
    async def classify(body: ClassificationRequest, raw: Request) -> Response:
        return await create_classification(state, body, raw)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        engine = state.ready_engine()
        state.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("send either `prompt` or `messages`.", 400, param="prompt")
        _need_tokenizer(engine)
        if body.messages is not None:
            ids = render_chat(engine, state.config.model.chat_template, body.messages,
                              add_generation_prompt=body.add_generation_prompt,
                              continue_final_message=body.continue_final_message,
                              template_kwargs=body.chat_template_kwargs)
            if body.add_special_tokens:
                ids = engine.tokenizer.build_inputs_with_special_tokens(ids)
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = engine.tokenizer.encode(body.prompt, add_special_tokens=add_special)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len,
                               "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        engine = state.ready_engine()
        state.resolve_model(body.model)
        _need_tokenizer(engine)
        if body.tokens:
            check_token_ids(body.tokens, len(engine.tokenizer), "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    return app


class JSONContentTypeMiddleware:
    """Read every POST body as JSON: `curl -d '{...}'` sends it as a form, and FastAPI would
    otherwise refuse a body without `Content-Type: application/json`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            ctype = dict(scope.get("headers", ())).get(b"content-type", b"")
            if b"json" not in ctype:
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def _install_engine_error_handler(app: FastAPI) -> None:
    """The engine's per-request errors are the client's to fix: 400 with the engine's words; a
    dead engine loop is a 503 (the liveness probe restarts the pod)."""
    try:
        from kubeinfer.engine.errors import EngineDeadError, RequestError
    except ImportError:
        return

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(str(exc.args[0] if exc.args else exc), 400,
                              getattr(exc, "param", None))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: Exception) -> JSONResponse:
        return error_response(str(exc), 503)
