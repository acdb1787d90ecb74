"""The OpenAI-compatible HTTP app: routes, their wiring, and the app's lifespan.

`build_app(lifecycle)` is all a caller needs; `kubeinfer serve` runs it under uvicorn, tests too.
Routes under /v1 plus /tokenize and /detokenize need the model and answer 503 while it loads;
/health says whether it has (and turns 503 the moment a drain begins); /metrics and /version
always answer. Every route's body passes `strict_json` first, and every response is documented in
/openapi.json (`openapi.py`, `response_models.py`).
"""
from __future__ import annotations

import contextlib
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubeinfer.engine.protocol import EngineClient
from kubeinfer.engine.server.auth import APIKeyMiddleware
from kubeinfer.engine.server.errors import APIError, install_error_handlers
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from kubeinfer.engine.server.openapi import install_openapi, responses_for
from kubeinfer.engine.server.protocol import (ChatCompletionRequest, ClassificationRequest,
                                              CompletionRequest,
                                              DetokenizeRequest, EmbeddingRequest,
                                              TokenizeRequest)
from kubeinfer.engine.server.request_prologue import check_token_ids
from kubeinfer.engine.server.response_models import (ChatCompletionResponse, ClassificationResponse,
                                                     CompletionResponse,
                                                     DetokenizeResponse, EmbeddingResponse,
                                                     HealthError, HealthResponse, ModelCard,
                                                     ModelList, TokenizeResponse, VersionResponse)
from kubeinfer.engine.server.response_parts import now
from kubeinfer.engine.server.serving_chat import (chat_template_for, create_chat_completion,
                                                  render_chat)
from kubeinfer.engine.server.serving_classification import create_classification
from kubeinfer.engine.server.serving_completion import create_completion
from kubeinfer.engine.server.serving_embedding import create_embedding
from kubeinfer.engine.server.strict_json import StrictJSONRoute


def _need_tokenizer(engine: EngineClient) -> None:
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


def build_app(lifecycle: ModelLifecycle, allowed_origins: list[str] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        lifecycle.start_loading()
        try:
            yield
        finally:
            await lifecycle.close()

    app = FastAPI(title="kubeinfer", version=version(), lifespan=lifespan)
    app.router.route_class = StrictJSONRoute
    app.state.server = lifecycle
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(JSONContentTypeMiddleware)
    if lifecycle.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=lifecycle.api_key)
    if allowed_origins:  # added last, so outermost: a 401 still carries CORS headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    _add_routes(app, lifecycle)
    return app


def _model_card(lifecycle: ModelLifecycle, name: str, engine: EngineClient, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "kubeinfer",
            "root": lifecycle.config.model.model, "parent": None,
            "max_model_len": engine.max_model_len}


def _add_routes(app: FastAPI, lifecycle: ModelLifecycle) -> None:
    @app.get("/health", response_model=None, responses={
        200: {"model": HealthResponse, "description": "The engine runs."},
        503: {"model": HealthError, "description": "Not ready, or shutting down."}})
    async def health() -> Response:
        if lifecycle.drain.is_draining:
            return JSONResponse({"error": "the server is shutting down"}, status_code=503)
        if lifecycle.engine is not None and lifecycle.engine.is_alive():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"error": lifecycle.not_ready_reason()}, status_code=503)

    @app.get("/version", response_model=None, responses=responses_for(VersionResponse))
    async def get_version() -> Response:
        return JSONResponse({"version": version()})

    @app.get("/metrics", response_model=None,
             responses=responses_for(None, media_type="text/plain"))
    async def metrics() -> Response:
        return Response(generate_latest(lifecycle.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=None, responses=responses_for(ModelList, 401, 503))
    async def models() -> Response:
        engine = lifecycle.ready_engine()
        created = now()
        return JSONResponse({"object": "list", "data": [
            _model_card(lifecycle, name, engine, created) for name in lifecycle.served_names]})

    @app.get("/v1/models/{model_id:path}", response_model=None,
             responses=responses_for(ModelCard, 401, 404, 503))
    async def model(model_id: str) -> Response:
        engine = lifecycle.ready_engine()
        lifecycle.resolve_model(model_id)
        return JSONResponse(_model_card(lifecycle, model_id, engine, now()))

    generation_errors = (400, 401, 404, 500, 503)

    @app.post("/v1/completions", response_model=None, responses=responses_for(
        CompletionResponse, *generation_errors, stream_chunk="CompletionChunk"))
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(lifecycle, body, raw)

    @app.post("/v1/chat/completions", response_model=None, responses=responses_for(
        ChatCompletionResponse, *generation_errors, stream_chunk="ChatCompletionChunk"))
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(lifecycle, body, raw)

    @app.post("/v1/embeddings", response_model=None,
              responses=responses_for(EmbeddingResponse, *generation_errors))
    async def embeddings(body: EmbeddingRequest, raw: Request) -> Response:
        return await create_embedding(lifecycle, body, raw)

    @app.post("/classify", response_model=None,
              responses=responses_for(ClassificationResponse, *generation_errors))
    @app.post("/v1/classify", response_model=None,  # vLLM serves /classify; SGLang /v1/classify
              responses=responses_for(ClassificationResponse, *generation_errors))
    async def classify(body: ClassificationRequest, raw: Request) -> Response:
        return await create_classification(lifecycle, body, raw)

    @app.post("/tokenize", response_model=None,
              responses=responses_for(TokenizeResponse, 400, 401, 404, 503))
    async def tokenize(body: TokenizeRequest) -> Response:
        engine = lifecycle.ready_engine()
        lifecycle.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("send either `prompt` or `messages`.", 400, param="prompt")
        _need_tokenizer(engine)
        if body.messages is not None:
            ids = render_chat(engine, chat_template_for(lifecycle, body.chat_template),
                              body.messages, add_generation_prompt=body.add_generation_prompt,
                              continue_final_message=body.continue_final_message,
                              template_kwargs=body.chat_template_kwargs,
                              from_request=body.chat_template is not None)
            if body.add_special_tokens:
                ids = engine.tokenizer.build_inputs_with_special_tokens(ids)
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = engine.tokenizer.encode(body.prompt, add_special_tokens=add_special)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len,
                               "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(out)

    @app.post("/detokenize", response_model=None,
              responses=responses_for(DetokenizeResponse, 400, 401, 404, 503))
    async def detokenize(body: DetokenizeRequest) -> Response:
        engine = lifecycle.ready_engine()
        lifecycle.resolve_model(body.model)
        _need_tokenizer(engine)
        if body.tokens:
            check_token_ids(body.tokens, len(engine.tokenizer), "tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)})


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
