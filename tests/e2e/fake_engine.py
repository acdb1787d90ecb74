"""A stand-in for `kubeinfer serve` in the operator's e2e tests that are about the operator, not the
engine: it starts at once and reports the load it is given.

    python fake_engine.py serve [MODEL] --port N [any other serve flag, ignored]

GET /health -> 200. GET /metrics -> vllm:num_requests_running (requests in flight) and
vllm:num_requests_waiting 0, in Prometheus text. POST /v1/completions {"hold": S} -> answers after S
seconds (default 1), counted as running meanwhile; any POST answers with the served model name
(--served-model-name, as the operator passes it) and the pod that served it (HOSTNAME), so the
router's e2e can tell where a request went.
"""
from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import time

running = 0
lock = threading.Lock()
served_model = "fake"


class Handler(http.server.BaseHTTPRequestHandler):
    def _send(self, code: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, "ok")
        elif self.path == "/metrics":
            self._send(200, f'vllm:num_requests_running{{model_name="fake"}} {running}\n'
                            f'vllm:num_requests_waiting{{model_name="fake"}} 0\n')
        else:
            self._send(404, "not found")

    def do_POST(self) -> None:
        global running
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with lock:
            running += 1
        try:
            time.sleep(float(body.get("hold", 1)))
        finally:
            with lock:
                running -= 1
        self._send(200, json.dumps({"model": served_model, "served_by": os.environ.get("HOSTNAME", ""),
                                    "choices": [{"text": "ok"}]}), "application/json")

    def log_message(self, *args) -> None:
        pass


def main(argv: list[str]) -> None:
    global served_model
    port = int(argv[argv.index("--port") + 1])
    if "--served-model-name" in argv:
        served_model = argv[argv.index("--served-model-name") + 1]
    print(f"fake engine on port {port}", flush=True)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv)
