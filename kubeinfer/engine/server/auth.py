"""API-key check: `Authorization: Bearer KEY` on every route but the probes'.

A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware, which would buffer streamed
responses and hide a client's disconnect from the handler.
"""
from __future__ import annotations

import hmac
import json

# kubelet probes and Prometheus scrapers carry no key
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {
            "message": "Missing or invalid API key: send `Authorization: Bearer <key>` with the "
                       "key the server was started with (--api-key or KUBEINFER_API_KEY).",
            "type": "AuthenticationError", "param": None, "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self._key)
        return False
