"""A trivial kopf operator, in-process, against the emulator: kopf logs in with a kubeconfig, discovers
the CRD, lists and watches, adds its finalizer, runs create/update/delete handlers, patches status, posts
events, and lets the object go."""
from __future__ import annotations

import asyncio
import threading
import time

import kopf
import pytest

from tests.k8s_emulator.conftest import WIDGET_CRD, Client

WIDGETS = "/apis/example.com/v1/namespaces/default/widgets"


def wait_for(what, check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def kopf_operator(emu):
    """Start a kopf operator on a thread of its own; yield the list of handled (verb, name)."""
    kube = Client(emu)
    kube.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGET_CRD)
    registry = kopf.OperatorRegistry()
    handled: list[tuple[str, str]] = []

    @kopf.on.login(registry=registry)  # an OperatorRegistry() of one's own comes without login handlers
    def login(**_):
        return kopf.ConnectionInfo(server=emu.url, scheme="Bearer", token=emu.token)

    @kopf.on.create("example.com", "v1", "widgets", registry=registry)
    def created(name, spec, patch, **_):
        handled.append(("create", name))
        patch.status["phase"] = "Created"
        patch.status["size"] = spec["size"]
        kopf.info({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {
            "name": name, "namespace": "default"}}, reason="Made", message=f"made {name}")

    @kopf.on.update("example.com", "v1", "widgets", field="spec.size", registry=registry)
    def resized(name, new, patch, **_):
        handled.append(("update", name))
        patch.status["size"] = new

    @kopf.on.delete("example.com", "v1", "widgets", registry=registry)
    def deleted(name, **_):
        handled.append(("delete", name))

    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 5
    settings.posting.level = 0
    stop_flag: asyncio.Event | None = None
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def main() -> None:
        nonlocal stop_flag
        stop_flag = asyncio.Event()
        ready.set()
        await kopf.operator(registry=registry, settings=settings, namespaces=["default"], standalone=True,
                            stop_flag=stop_flag)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield handled
    finally:
        loop.call_soon_threadsafe(stop_flag.set)
        thread.join(20)


def test_kopf_handles_a_custom_resource_through_the_emulator(emu, kopf_operator):
    kube = Client(emu)
    handled = kopf_operator
    kube.ok("POST", WIDGETS, {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1"},
                              "spec": {"size": 3}})
    status = wait_for("the create handler's status", lambda: kube.ok("GET", f"{WIDGETS}/w1").get("status"))
    assert status["phase"] == "Created" and status["size"] == 3
    body = kube.ok("GET", f"{WIDGETS}/w1")
    assert body["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
    events = kube.ok("GET", "/api/v1/namespaces/default/events")["items"]
    assert any(e["reason"] == "Made" and e["involvedObject"]["name"] == "w1" for e in events)

    kube.ok("PATCH", f"{WIDGETS}/w1", {"spec": {"size": 5}}, content_type="application/merge-patch+json")
    wait_for("the update handler", lambda: kube.ok("GET", f"{WIDGETS}/w1")["status"].get("size") == 5)

    kube.ok("DELETE", f"{WIDGETS}/w1")
    wait_for("kopf to release its finalizer", lambda: kube.call("GET", f"{WIDGETS}/w1")[0] == 404)
    assert handled == [("create", "w1"), ("update", "w1"), ("delete", "w1")]
