"""Controllers, garbage collector and kubelet together: Deployments of a tiny local HTTP server."""
from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from typing import Any

from tests.k8s_emulator.conftest import Client

POD_SERVER = r"""
import http.server, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if self.path == "/live" and os.path.exists(os.environ.get("SICK_FILE", "/nonexistent")) else 200
        body = f"{os.environ.get('GREETING', 'hi')} from {os.environ['HOSTNAME']}".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("serving on", port, flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""
NS = "/api/v1/namespaces/default"
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def container(**extra: Any) -> dict[str, Any]:
    return {"name": "web", "image": "python:3.11", "command": ["python", "-c", POD_SERVER, "--port", "8000"],
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1}, **extra}


def deployment(name: str, **container_extra: Any) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"terminationGracePeriodSeconds": 1,
                                           "containers": [container(**container_extra)]}}}}


def pods(kube: Client, selector: str) -> list[dict[str, Any]]:
    return kube.ok("GET", f"{NS}/pods", labelSelector=selector)["items"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_deployment_rollout_service_proxy_and_cascade(emu_with_kubelet):
    emu, kube = emu_with_kubelet, Client(emu_with_kubelet)
    kube.ok("POST", f"{NS}/secrets", {"metadata": {"name": "greeting"},
                                      "data": {"text": base64.b64encode(b"hello").decode()}})
    env = [{"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "greeting", "key": "text"}}}]
    kube.ok("POST", DEPLOYMENTS, deployment("web", env=env))
    kube.ok("POST", f"{NS}/services", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})

    dep = wait_for("the Deployment to be ready",
                   lambda: (d := kube.ok("GET", f"{DEPLOYMENTS}/web")).get("status", {}).get("readyReplicas") and d)
    assert dep["status"]["observedGeneration"] == 1 and dep["status"]["updatedReplicas"] == 1
    [pod] = pods(kube, "app=web")
    rs_name = pod["metadata"]["ownerReferences"][0]["name"]
    assert rs_name == f"web-{pod['metadata']['labels']['pod-template-hash']}"
    assert pod["metadata"]["name"].startswith(rs_name + "-")
    assert pod["status"]["phase"] == "Running" and pod["status"]["containerStatuses"][0]["ready"]
    rs = kube.ok("GET", f"/apis/apps/v1/namespaces/default/replicasets/{rs_name}")
    assert rs["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]

    reply = kube.http.get(emu.proxy_url("default", "web:http") + "/anything")
    assert reply.status_code == 200 and reply.text == f"hello from {pod['metadata']['name']}"
    old_pid = emu.kubelet.runtime_of("default", pod["metadata"]["name"]).process.pid
    assert "serving on" in kube.call("GET", f"{NS}/pods/{pod['metadata']['name']}/log")[1]

    # a new pod template: a new ReplicaSet, a new pod, and the old one goes once the new one is ready
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "web", "env": env + [
        {"name": "EXTRA", "value": "1"}]}]}}}}
    kube.ok("PATCH", f"{DEPLOYMENTS}/web", patch, content_type="application/strategic-merge-patch+json")
    new_pod = wait_for("the replacement pod", lambda: [
        p for p in pods(kube, "app=web") if p["metadata"]["name"] != pod["metadata"]["name"]
        and p.get("status", {}).get("containerStatuses", [{}])[0].get("ready")])[0]
    assert new_pod["metadata"]["labels"]["pod-template-hash"] != pod["metadata"]["labels"]["pod-template-hash"]
    wait_for("the old pod to go", lambda: [p["metadata"]["name"] for p in pods(kube, "app=web")]
             == [new_pod["metadata"]["name"]])
    wait_for("the old process to end", lambda: not alive(old_pid))
    dep = wait_for("the rollout to finish", lambda: (d := kube.ok("GET", f"{DEPLOYMENTS}/web"))["status"].get(
        "observedGeneration") == 2 and d["status"].get("updatedReplicas") == 1 and d)
    assert dep["status"]["readyReplicas"] == 1

    new_pid = emu.kubelet.runtime_of("default", new_pod["metadata"]["name"]).process.pid
    kube.ok("DELETE", f"{DEPLOYMENTS}/web")
    wait_for("pods and ReplicaSets to be collected", lambda: not pods(kube, "app=web") and not kube.ok(
        "GET", "/apis/apps/v1/namespaces/default/replicasets")["items"])
    wait_for("the process to end", lambda: not alive(new_pid))


def test_crash_loop_reports_restarts_and_the_log_tail(emu_with_kubelet):
    kube = Client(emu_with_kubelet)
    kube.ok("POST", f"{NS}/pods", {"metadata": {"name": "crash"}, "spec": {"containers": [{
        "name": "c", "image": "python", "command": ["python", "-c", "print('boom: no model'); raise SystemExit(2)"],
        "terminationMessagePolicy": "FallbackToLogsOnError"}]}})
    status = wait_for("two restarts", lambda: (s := kube.ok("GET", f"{NS}/pods/crash").get("status", {})).get(
        "containerStatuses", [{}])[0].get("restartCount", 0) >= 2 and s)
    cs = status["containerStatuses"][0]
    assert cs["lastState"]["terminated"]["exitCode"] == 2
    assert "boom: no model" in cs["lastState"]["terminated"]["message"]
    assert cs["state"].get("waiting", {}).get("reason") in ("CrashLoopBackOff", None)


def test_failing_liveness_probe_restarts_the_container(emu_with_kubelet, tmp_path):
    kube = Client(emu_with_kubelet)
    sick = tmp_path / "sick"
    sick.touch()
    kube.ok("POST", f"{NS}/pods", {"metadata": {"name": "sick"}, "spec": {"containers": [container(
        env=[{"name": "SICK_FILE", "value": str(sick)}],
        livenessProbe={"httpGet": {"path": "/live", "port": 8000}, "periodSeconds": 1, "failureThreshold": 1})]}})
    wait_for("a liveness restart", lambda: kube.ok("GET", f"{NS}/pods/sick").get("status", {}).get(
        "containerStatuses", [{}])[0].get("restartCount", 0) >= 1)


def test_unschedulable_and_misconfigured_pods(emu_with_kubelet):
    kube = Client(emu_with_kubelet)
    kube.ok("POST", f"{NS}/pods", {"metadata": {"name": "gpu"}, "spec": {"containers": [container(
        resources={"limits": {"nvidia.com/gpu": 1}})]}})
    cond = wait_for("PodScheduled=False", lambda: [c for c in kube.ok("GET", f"{NS}/pods/gpu").get(
        "status", {}).get("conditions", []) if c["type"] == "PodScheduled" and c["status"] == "False"])[0]
    assert cond["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in cond["message"]

    kube.ok("POST", f"{NS}/pods", {"metadata": {"name": "nosecret"}, "spec": {"containers": [container(
        env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}])]}})
    waiting = wait_for("CreateContainerConfigError", lambda: kube.ok("GET", f"{NS}/pods/nosecret").get(
        "status", {}).get("containerStatuses", [{}])[0].get("state", {}).get("waiting"))
    assert waiting["reason"] == "CreateContainerConfigError" and 'secret "absent"' in waiting["message"]

    for name in ("gpu", "nosecret"):
        kube.ok("DELETE", f"{NS}/pods/{name}")
    wait_for("both pods gone", lambda: not kube.ok("GET", f"{NS}/pods")["items"])


def test_stopping_the_emulator_ends_every_pod_process(tmp_path):
    from tests.k8s_emulator import Emulator

    with Emulator(tmp_path) as emu:
        kube = Client(emu)
        kube.ok("POST", f"{NS}/pods", {"metadata": {"name": "p"}, "spec": {"containers": [container()]}})
        pid = wait_for("the process", lambda: (r := emu.kubelet.runtime_of("default", "p")) and r.process
                       and r.process.pid)
    assert not alive(pid)
