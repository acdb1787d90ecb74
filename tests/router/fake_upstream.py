"""A tiny OpenAI-shaped replica for the router tests: answers name who served it, and can be told
to answer 503, to hold answers until released, or to stream one chunk and hold the rest.

Run in a thread (`Upstream.start`) or as a process (`python -m tests.router.fake_upstream --port P
--name N --hold`) that a test kills with SIGKILL: a replica that dies mid-load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

HOLD_LIMIT = 5.0  # seconds a held answer waits for release at most (a test never needs that long)


class Behaviour:
    def __init__(self, name: str, hold: bool = False) -> None:
        self.name = name
        self.status = 200
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.bodies: list[dict] = []

    async def wait_release(self) -> None:
        deadline = time.monotonic() + HOLD_LIMIT
        while not self.release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def _chunk(model: str, text: str) -> bytes:
    data = {"object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(data)}\n\n".encode()


def build_app(b: Behaviour) -> Starlette:
    async def generate(request: Request) -> Response:
        body = await request.json()
        b.bodies.append(body)
        if b.status != 200:
            return JSONResponse({"error": {"message": f"{b.name} says {b.status}", "type": "x",
                                           "param": None, "code": b.status}}, status_code=b.status)
        model = body.get("model")
        if body.get("stream"):
            async def events():
                yield _chunk(model, b.name)
                await b.wait_release()
                yield _chunk(model, "!")
                yield b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        await b.wait_release()
        return JSONResponse({"object": "chat.completion", "model": model, "served_by": b.name,
                             "path": request.url.path, "query": request.url.query,
                             "auth": request.headers.get("authorization")})

    paths = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
    return Starlette(routes=[Route(p, generate, methods=["POST"]) for p in paths])


class Upstream:
    """A fake replica on 127.0.0.1 in a background thread."""

    def __init__(self, name: str, port: int, hold: bool = False) -> None:
        self.behaviour = Behaviour(name, hold)
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.behaviour), host="127.0.0.1", port=port,
                                                    log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"fake upstream {self.behaviour.name} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.behaviour.release.set()
        self.server.should_exit = True
        self.thread.join(10)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--hold", action="store_true")
    args = p.parse_args()
    uvicorn.run(build_app(Behaviour(args.name, args.hold)), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
