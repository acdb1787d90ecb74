"""KubeApi over real HTTP (the official client's connection), against a tiny scripted server."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client

from kubeinfer.operator.apply import ApiError, KubeApi


class Scripted(BaseHTTPRequestHandler):
    routes: dict = {}
    seen: list = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        type(self).seen.append((self.command, self.path, dict(self.headers), body))
        code, payload = type(self).routes.get((self.command, self.path.split("?")[0]),
                                              (404, {"kind": "Status", "reason": "NotFound",
                                                     "message": "not found", "code": 404}))
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Scripted.routes, Scripted.seen = {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def api_for(httpd) -> KubeApi:
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{httpd.server_address[1]}"
    cfg.api_key = {"authorization": "Bearer t0ken"}
    return KubeApi(client.ApiClient(cfg), timeout=5)


DEPLOYMENTS = "/apis/apps/v1/namespaces/ns/deployments"


def test_list_sends_selector_and_token_and_fills_kind(server):
    Scripted.routes[("GET", DEPLOYMENTS)] = (200, {"items": [{"metadata": {"name": "llm"}}]})
    items = api_for(server).list("Deployment", "ns", "kubeinfer.io/inferenceservice=llm")
    assert items == [{"metadata": {"name": "llm"}, "apiVersion": "apps/v1", "kind": "Deployment"}]
    method, path, headers, _ = Scripted.seen[0]
    assert path.split("?")[0] == DEPLOYMENTS
    assert parse_qs(urlsplit(path).query) == {"labelSelector": ["kubeinfer.io/inferenceservice=llm"]}
    assert headers["authorization"] == "Bearer t0ken"


def test_create_conflict_and_status_mapping(server):
    Scripted.routes[("POST", DEPLOYMENTS)] = (409, {"kind": "Status", "reason": "AlreadyExists",
                                                    "message": "deployments.apps \"llm\" already exists"})
    api = api_for(server)
    with pytest.raises(ApiError) as info:
        api.create({"kind": "Deployment", "metadata": {"name": "llm", "namespace": "ns"}})
    assert (info.value.status, info.value.reason) == (409, "AlreadyExists") and info.value.retryable
    assert Scripted.seen[0][3]["metadata"]["name"] == "llm"


def test_get_and_delete_not_found_are_not_errors(server):
    api = api_for(server)
    assert api.get("Service", "ns", "llm") is None
    assert api.delete("Service", "ns", "llm") is False
    assert Scripted.seen[-1][3]["propagationPolicy"] == "Background"


def test_invalid_is_not_retryable(server):
    Scripted.routes[("PUT", f"{DEPLOYMENTS}/llm")] = (422, {"reason": "Invalid", "message": "bad"})
    with pytest.raises(ApiError) as info:
        api_for(server).replace({"kind": "Deployment", "metadata": {"name": "llm", "namespace": "ns"}})
    assert info.value.invalid and not info.value.retryable


def test_leaderworkerset_discovery(server):
    api = api_for(server)
    assert api.serves_leaderworkerset() is False
    Scripted.routes[("GET", "/apis/leaderworkerset.x-k8s.io/v1")] = (
        200, {"kind": "APIResourceList", "resources": [{"name": "leaderworkersets"}]})
    assert api.serves_leaderworkerset() is True


def test_unreachable_server_is_retryable():
    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"
    cfg.retries = 0
    with pytest.raises(ApiError) as info:
        KubeApi(client.ApiClient(cfg), timeout=2).get("Pod", "ns", "x")
    assert info.value.status == 0 and info.value.retryable
