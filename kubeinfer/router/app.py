"""`build_app`: the router's HTTP surface.

    POST /v1/chat/completions, /v1/completions, /v1/embeddings   routed by "model" (proxy.py)
    GET  /v1/models, /v1/models/{id}     every model an InferenceService serves, ready or not (a
                                         model scaled to zero is still served: it is held for)
    GET  /health                         200 once the endpoint source wrote its first table, else 503
    GET  /metrics                        Prometheus (metrics.py)
    GET  /queue                          held and in-flight requests per model, for the autoscaler

Anything else is a 404 (405 for a wrong method) in OpenAI's error shape.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kubeinfer.router.config import RouterConfig
from kubeinfer.router.endpoints import Backend, EndpointTable
from kubeinfer.router.errors import error_response
from kubeinfer.router.metrics import RouterMetrics
from kubeinfer.router.proxy import Proxy

ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def _card(backend: Backend, created: int) -> dict:
    return {"id": backend.model, "object": "model", "created": created, "owned_by": "kubeinfer",
            "namespace": backend.namespace, "inferenceservice": backend.inference_service,
            "ready_replicas": len(backend.endpoints)}


def build_app(config: RouterConfig, source, table: EndpointTable | None = None,
              proxy: Proxy | None = None) -> Starlette:
    """`source` has start(table, loop) and stop(): it keeps `table` current while the app runs."""
    table = table or EndpointTable()
    metrics = proxy.metrics if proxy else RouterMetrics()
    proxy = proxy or Proxy(config, table, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        source.start(table, asyncio.get_running_loop())
        try:
            yield
        finally:
            source.stop()
            await proxy.aclose()

    async def routed(request: Request) -> Response:
        return await proxy.handle(request, request.url.path)

    async def models(_request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_card(b, created) for b in table.backends()]})

    async def model(request: Request) -> Response:
        name = request.path_params["model_id"]
        backend = table.get(name)
        if backend is None:
            return error_response(f"The model `{name}` does not exist. GET /v1/models lists the models "
                                  "this router serves.", 404, param="model")
        return JSONResponse(_card(backend, created))

    async def health(_request: Request) -> Response:
        if not table.synced:
            return JSONResponse({"status": "starting", "detail": "the endpoint source has not listed "
                                 "the InferenceServices yet"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(_request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def queue(_request: Request) -> Response:
        held = proxy.queue.held()
        rows = []
        for b in table.backends():
            rows.append({"model": b.model, "namespace": b.namespace, "inferenceservice": b.inference_service,
                         "held": held.pop((b.model, b.namespace, b.inference_service), 0),
                         "in_flight": sum(proxy.in_flight.get(e.address) for e in b.endpoints),
                         "ready_replicas": len(b.endpoints)})
        # held for a model the table does not know yet (before the first sync)
        for (m, ns, name), n in sorted(held.items()):
            rows.append({"model": m, "namespace": ns, "inferenceservice": name, "held": n,
                         "in_flight": 0, "ready_replicas": 0})
        return JSONResponse({"models": rows})

    async def http_error(_request: Request, exc: HTTPException) -> Response:
        message = "Not found: the router serves " + ", ".join(ROUTED_PATHS) + " and GET /v1/models" \
            if exc.status_code == 404 else str(exc.detail)
        return error_response(message, exc.status_code)

    routes = [Route(p, routed, methods=["POST"]) for p in ROUTED_PATHS] + [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/queue", queue, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.proxy, app.state.table = proxy, table
    return app
