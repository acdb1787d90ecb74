"""The LeaderWorkerSet controller with the stand-in kubelet: a group's pods, LWS's labels and env,
ports shared within a group, RecreateGroupOnPodRestart, status, and the vendored CRD's schema."""
from __future__ import annotations

import copy
from typing import Any

from tests.k8s_emulator.conftest import Client
from tests.k8s_emulator.leaderworkersets import GROUP_PORTS, install_leaderworkerset_crd
from tests.k8s_emulator.test_workloads import pods, wait_for

# node 0 listens on --master-port; the others connect to LWS_LEADER_ADDRESS:--master-port
NODE = r"""
import os, socket, sys, time
port = int(sys.argv[sys.argv.index("--master-port") + 1])
if os.environ["LWS_WORKER_INDEX"] == "0":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen()
    while True:
        conn, _ = s.accept()
        print("joined", conn.recv(64).decode(), flush=True)
else:
    while True:
        try:
            c = socket.create_connection((os.environ["LWS_LEADER_ADDRESS"], port), timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    c.sendall(os.environ["LWS_WORKER_INDEX"].encode())
    time.sleep(3600)
"""
LWS_PATH = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/default/leaderworkersets"


def lws(size: int = 2) -> dict[str, Any]:
    container = {"name": "node", "image": "python:3.11", "command": ["python", "-c", NODE],
                 "args": ["--master-port", "29500"],
                 "ports": [{"name": "dist", "containerPort": 29500}]}
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
            "metadata": {"name": "grp"},
            "spec": {"replicas": 1, "leaderWorkerTemplate": {
                "size": size, "restartPolicy": "RecreateGroupOnPodRestart",
                "workerTemplate": {"metadata": {"labels": {"app": "grp"}},
                                   "spec": {"terminationGracePeriodSeconds": 1, "containers": [container]}}}}}


def by_name(kube: Client) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in pods(kube, "app=grp") if not p["metadata"].get("deletionTimestamp")}


def running(kube: Client) -> dict[str, dict[str, Any]] | None:
    found = by_name(kube)
    ok = set(found) == {"grp-0", "grp-0-1"} and all(
        (p.get("status") or {}).get("phase") == "Running" for p in found.values())
    return found if ok else None


def test_a_group_starts_meets_on_shared_ports_and_restarts_as_a_unit(emu_with_kubelet):
    emu, kube = emu_with_kubelet, Client(emu_with_kubelet)
    install_leaderworkerset_crd(emu.store)
    bad = copy.deepcopy(lws())
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"
    code, body = kube.call("POST", LWS_PATH, bad)
    assert code == 422 and "restartPolicy" in body["message"]
    kube.ok("POST", LWS_PATH, lws())
    found = wait_for("the group's two pods running", lambda: running(kube))
    leader, worker = found["grp-0"], found["grp-0-1"]
    assert leader["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert worker["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/group-index"] == "0"
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    assert env == {"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
    assert leader["metadata"]["annotations"][GROUP_PORTS] == worker["metadata"]["annotations"][GROUP_PORTS]
    wait_for("the worker to reach node 0 on the group's port",
             lambda: "joined 1" in (emu.kubelet.logs("default", "grp-0") or ""))
    wait_for("readyReplicas 1", lambda: (kube.ok("GET", f"{LWS_PATH}/grp").get("status") or {})
             .get("readyReplicas") == 1)

    kube.ok("DELETE", "/api/v1/namespaces/default/pods/grp-0-1")
    old_uid = leader["metadata"]["uid"]
    again = wait_for("the whole group recreated", lambda: (r := running(kube)) and
                     r["grp-0"]["metadata"]["uid"] != old_uid and r, timeout=30)
    assert again["grp-0"]["metadata"]["annotations"][GROUP_PORTS] == \
        again["grp-0-1"]["metadata"]["annotations"][GROUP_PORTS]
    # the log file of a pod name is appended to: the second start is the new group's
    wait_for("the new worker to reach the new node 0",
             lambda: (emu.kubelet.logs("default", "grp-0") or "").count("joined 1") == 2)


def ready_groups(kube: Client) -> dict[str, set[str]]:
    """group index -> the template revisions of its pods, for groups whose two pods are all ready."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for pod in by_name(kube).values():
        groups.setdefault(pod["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/group-index"], []).append(pod)
    ready = {}
    for g, members in groups.items():
        if len(members) == 2 and all(any(c["type"] == "Ready" and c["status"] == "True"
                                         for c in (p.get("status") or {}).get("conditions") or [])
                                     for p in members):
            ready[g] = {p["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/template-revision-hash"]
                        for p in members}
    return ready


def test_a_rollout_with_a_surge_group_keeps_one_replica_serving(emu_with_kubelet):
    import time
    emu, kube = emu_with_kubelet, Client(emu_with_kubelet)
    install_leaderworkerset_crd(emu.store)
    body = lws()
    # ready only after a probe (the kubelet probes at most once a second), so a gap would be seen
    body["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["readinessProbe"] = {
        "exec": {"command": ["true"]}, "periodSeconds": 1}
    body["spec"]["rolloutStrategy"] = {"type": "RollingUpdate",
                                       "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1}}
    kube.ok("POST", LWS_PATH, body)
    before = wait_for("group 0 ready", lambda: ready_groups(kube).get("0"))
    current = kube.ok("GET", f"{LWS_PATH}/grp")
    current["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["env"] = [
        {"name": "VERSION", "value": "2"}]
    kube.ok("PUT", f"{LWS_PATH}/grp", current)
    deadline = time.monotonic() + 30
    while True:   # the invariant at every look: some group is whole and ready
        groups = ready_groups(kube)
        assert groups, "no group was ready during the rollout"
        if set(groups) == {"0"} and groups["0"].isdisjoint(before) and len(by_name(kube)) == 2:
            break   # done: group 0 on the new template, the surge group gone
        assert time.monotonic() < deadline, f"the rollout did not finish: {groups}"
        time.sleep(0.05)
