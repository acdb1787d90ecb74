"""`Proxy`: one OpenAI request from the router to a replica and its answer back, untouched.

    read the body (bounded) -> its "model" -> EndpointTable -> (no ready replica: HoldQueue)
    -> Balancer picks a replica -> send -> wait for the first byte of the answer
    -> stream it back as it comes (no buffering: SSE chunks pass as they arrive)

Before the first byte reaches the client nothing is lost by trying again, so a connection that
cannot be made or breaks before the first byte of the answer, or a 503 (a draining or overloaded
replica), is retried once on another replica, and counted against the replica in the
`OutlierDetector`. Once the answer started the router only passes it on; a replica that dies then
ends an SSE stream with an error event and `[DONE]`, as the engine's own server does.

A client that goes away while its request is held or waiting for its first byte cancels it (the
replica sees the connection close and aborts the request), so the held count stays true.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kubeinfer.router.balancer import Balancer, InFlight
from kubeinfer.router.config import RouterConfig
from kubeinfer.router.endpoints import Backend, Endpoint, EndpointTable
from kubeinfer.router.errors import error_response
from kubeinfer.router.metrics import RouterMetrics
from kubeinfer.router.outliers import OutlierDetector
from kubeinfer.router.prefix_key import prefix_key
from kubeinfer.router.queue import HoldQueue, Unavailable, UnknownModel

log = logging.getLogger(__name__)

# hop-by-hop headers (RFC 9110 7.6.1) and those the HTTP client or server sets again
_DROP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                   "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
CLIENT_GONE = 499  # nginx's code for a client that closed its connection; only metrics see it


class _Retry(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _UpstreamResponse(StreamingResponse):
    """Runs `on_close` however the response ends, even when it never started sending."""

    def __init__(self, *args: Any, on_close: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def _sse_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "BadGatewayError", "param": None, "code": 502}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Proxy:
    def __init__(self, config: RouterConfig, table: EndpointTable, metrics: RouterMetrics,
                 client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.table = table
        self.metrics = metrics
        self.in_flight = InFlight()
        self.balancer = Balancer(self.in_flight, load_factor=config.load_factor,
                                 ring_replicas=config.ring_replicas)
        self.outliers = OutlierDetector(config.max_failures, config.eject_seconds)
        self.queue = HoldQueue(table, metrics, max_size=config.max_queue_size, max_wait=config.max_queue_wait)
        # no read timeout: a long generation is not a failure; no pool limit: the engine queues
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=config.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def handle(self, request: Request, path: str) -> Response:
        model = ""
        response = await self._read(request)
        if isinstance(response, tuple):
            body, payload = response
            model = payload["model"]
            work = asyncio.ensure_future(self._route(request, path, body, payload))
            gone = asyncio.ensure_future(_client_gone(request))
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                gone.cancel()
                response = work.result()
            else:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                response = Response(status_code=CLIENT_GONE)
        known = self.table.get(model) is not None
        self.metrics.requests.labels(model if known else "", str(response.status_code)).inc()
        return response

    async def _read(self, request: Request) -> tuple[bytes, dict] | Response:
        limit = self.config.max_body_bytes
        too_big = error_response(f"request body is larger than {limit} bytes; send a smaller request "
                                 "(the router's --max-body-bytes)", 413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return too_big
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return error_response(f"request body is not valid JSON ({e}); send a JSON object", 400)
        if not isinstance(payload, dict):
            return error_response("request body must be a JSON object", 400)
        if not isinstance(payload.get("model"), str) or not payload["model"]:
            return error_response("'model' is required: name the model to use (GET /v1/models lists "
                                  "them)", 400, param="model")
        return body, payload

    async def _route(self, request: Request, path: str, body: bytes, payload: dict) -> Response:
        model = payload["model"]
        try:
            backend = await self.queue.wait_ready(model)
        except UnknownModel:
            return error_response(f"The model `{model}` does not exist. GET /v1/models lists the models "
                                  "this router serves.", 404, param="model")
        except Unavailable as e:
            return error_response(str(e), 503, retry_after=self.config.retry_after)
        key = None
        if backend.strategy == "prefix-hash":
            # the InferenceService's spec.loadBalancing.prefixHash wins over the router's flags
            key = prefix_key(payload, chars=backend.prefix_chars or self.config.prefix_chars,
                             tokens=backend.prefix_tokens or self.config.prefix_tokens)
        url_path = path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        tried: list[str] = []
        failure = ""
        for attempt in range(2):
            backend = self.table.get(model) or backend
            endpoint = self._choose(backend, key, tried)
            if endpoint is None:
                break
            tried.append(endpoint.address)
            last = attempt == 1 or all(e.address in tried for e in backend.endpoints)
            try:
                return await self._send(backend, endpoint, request.method, url_path, headers, body, last)
            except _Retry as e:
                failure = f"{endpoint.address}: {e}"
                if self.outliers.failure(endpoint.address):
                    self.metrics.ejections.labels(model).inc()
                    log.warning("replica %s of %s failed %d times in a row; skipping it for %g s",
                                endpoint.address, backend.key, self.outliers.max_failures,
                                self.outliers.eject_seconds)
                if not last:
                    self.metrics.retries.labels(model, e.reason).inc()
                    log.info("retrying a request for %r on another replica: %s", model, failure)
        why = f" ({failure})" if failure else ": its replicas went away"
        return error_response(f"no replica of model {model!r} could take the request{why}; try again "
                              "later", 503, retry_after=self.config.retry_after)

    def _choose(self, backend: Backend, key: str | None, tried: list[str]) -> Endpoint | None:
        ejected = self.outliers.ejected([e.address for e in backend.endpoints])
        endpoint = self.balancer.pick(backend, key, set(tried) | ejected)
        # every untried replica is being skipped: one of them is still better than no answer
        return endpoint or self.balancer.pick(backend, key, set(tried))

    async def _send(self, backend: Backend, endpoint: Endpoint, method: str, path: str,
                    headers: list[tuple[str, str]], body: bytes, last: bool) -> Response:
        model, address = backend.model, endpoint.address
        self.in_flight.add(address)
        self.metrics.in_flight.labels(model).inc()
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight.done(address)
                self.metrics.in_flight.labels(model).dec()

        upstream: httpx.Response | None = None
        try:
            start = time.monotonic()
            req = self.client.build_request(method, endpoint.url + path, headers=headers, content=body)
            upstream = await self.client.send(req, stream=True)
            if upstream.status_code == 503 and not last:
                raise _Retry("503", "answered 503")
            chunks = upstream.aiter_raw()
            first = await anext(chunks, b"")
            self.metrics.upstream_latency.labels(model).observe(time.monotonic() - start)
        except httpx.TransportError as e:
            await self._close(upstream, release)
            raise _Retry(type(e).__name__, str(e) or type(e).__name__) from e
        except BaseException:
            await self._close(upstream, release)
            raise
        if upstream.status_code != 503:
            self.outliers.success(address)
        is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")

        async def relay():
            yield first
            try:
                async for chunk in chunks:
                    yield chunk
            except httpx.TransportError as e:
                log.warning("replica %s of %s broke off a response: %s", address, backend.key, e)
                if is_sse:
                    yield _sse_error(f"the replica serving this request failed ({type(e).__name__}); "
                                     "the response is incomplete")

        out_headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP]
        return _UpstreamResponse(relay(), status_code=upstream.status_code, headers=dict(out_headers),
                                 on_close=lambda: self._close(upstream, release))

    @staticmethod
    async def _close(upstream: httpx.Response | None, release) -> None:
        try:
            if upstream is not None:
                await upstream.aclose()
        finally:
            await release()
