"""What the emulator offers besides the API: the pods proxy subresource, the termination message
file, and injected API failures."""
from __future__ import annotations

from tests.k8s_emulator.conftest import Client
from tests.k8s_emulator.faults import Faults
from tests.k8s_emulator.test_workloads import NS, container, wait_for

WRITE_AND_FAIL = ("import os, sys; open(os.environ['MSG'], 'w').write('model not found: org/x');"
                  "print('a log line that is not the message'); sys.exit(1)")


def test_pods_proxy_reaches_the_pod(emu_with_kubelet):
    kube = Client(emu_with_kubelet)
    kube.ok("POST", f"{NS}/pods", {"metadata": {"name": "web"}, "spec": {"containers": [container(
        env=[{"name": "GREETING", "value": "hello"}])]}})
    wait_for("the pod to be ready", lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                                                (kube.ok("GET", f"{NS}/pods/web").get("status") or {})
                                                .get("conditions") or []))
    for name_port in ("web", "web:8000", "web:http"):
        code, body = kube.call("GET", f"{NS}/pods/{name_port}/proxy/metrics")
        assert (code, body) == (200, "hello from web"), name_port
    code, body = kube.call("GET", f"{NS}/pods/nope:8000/proxy/metrics")
    assert code == 503 and "not running" in body["message"]


def test_the_termination_message_file_wins_over_the_log(emu_with_kubelet):
    kube = Client(emu_with_kubelet)
    kube.ok("POST", f"{NS}/pods", {"metadata": {"name": "fail"}, "spec": {"containers": [{
        "name": "c", "image": "python", "command": ["python", "-c", WRITE_AND_FAIL],
        "env": [{"name": "MSG", "value": "/dev/termination-log"}],
        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "FallbackToLogsOnError"}]}})
    status = wait_for("a restart", lambda: (s := kube.ok("GET", f"{NS}/pods/fail").get("status", {})).get(
        "containerStatuses", [{}])[0].get("restartCount", 0) >= 1 and s)
    assert status["containerStatuses"][0]["lastState"]["terminated"]["message"] == "model not found: org/x"


def test_injected_faults_fail_a_share_and_spare_the_exempt(emu):
    kube = Client(emu)
    emu.server.faults = Faults(0.5, seed=1, exempt=lambda request: request.headers.get("X-Test") == "spare")
    codes = [kube.call("GET", f"{NS}/configmaps")[0] for _ in range(200)]
    assert set(codes) <= {200, 429, 500, 503} and 60 <= codes.count(200) <= 140
    spared = kube.http.get(f"{NS}/configmaps", headers={"X-Test": "spare"})
    assert spared.status_code == 200
    failed = next(c for c in codes if c != 200)
    emu.server.faults = None
    assert failed in (429, 500, 503) and all(kube.call("GET", f"{NS}/configmaps")[0] == 200 for _ in range(20))
