"""Pure: the pods of a pipeline-parallel InferenceService (spec.parallelism.pipeline > 1), one
engine node per pod, and the Secret their connections share.

A group is `pipeline` pods that together hold one copy of the model. Node 0 (the leader) runs
`kubeinfer serve ... --nnodes N --node-rank 0 --master-addr <its own pod IP> --master-port 29500`:
the engine, the API server and torch.distributed's store; every other node runs
`--headless --node-rank R --master-addr <the leader's address>`, only its ranks, which node 0 drives
(kubeinfer/engine/node_relay.py). Node 0 listens on MASTER_PORT and MASTER_PORT + 1.

    LeaderWorkerSet   leaderTemplate = node 0, workerTemplate = the others; R is LWS_WORKER_INDEX and
                      the leader's address LWS_LEADER_ADDRESS (both injected by LWS into every
                      container); RecreateGroupOnPodRestart, so a lost pod restarts its whole group
                      (the engine cannot take a stage back); a surge group keeps a one-replica
                      rollout serving; spec.parallelism.exclusiveTopology -> LWS's
                      exclusive-topology annotation.
    StatefulSet       one per group, one template for every pod: R is the pod-index label (downward
                      API), the leader is pod 0's stable name behind the headless Service; a small
                      shell wrapper adds --headless for R > 0, and the probes ask /health only on R
                      0 (an exec probe), since a headless node serves no HTTP. A lost node ends
                      its peers' processes (node_relay), so the group restarts and meets again;
                      exclusiveTopology becomes pod affinity (together) and anti-affinity (apart
                      from the other groups) on the topology key.

Headless LWS workers get no probes: they serve nothing to probe, and a worker that dies (or whose
leader dies) exits, which restarts the group. The node Secret (NAME-node-secret, key node-secret)
is created once by the operator with a random value (apply.ensure_secret) and reaches every pod as
$KUBEINFER_NODE_SECRET through a secretKeyRef; its value is in that Secret only (and in the output
of `kubeinfer render`, which includes a fresh one), never in a log line, an event or a status.
"""
from __future__ import annotations

import copy

from kubeinfer.operator import podspec
from kubeinfer.operator.spec import InferenceServiceSpec

MASTER_PORT = podspec.DIST_PORT      # node 0's torch.distributed store; its calls use the next port
NODE_SECRET_KEY = "node-secret"
NODE_SECRET_ENV = "KUBEINFER_NODE_SECRET"   # read by kubeinfer/engine/node_relay.py
POD_IP_ENV = "KUBEINFER_POD_IP"
NODE_RANK_ENV = "KUBEINFER_NODE_RANK"
LWS_LEADER_ADDRESS, LWS_WORKER_INDEX = "LWS_LEADER_ADDRESS", "LWS_WORKER_INDEX"   # LWS's env
LWS_EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/exclusive-topology"
# a one-replica rollout keeps its old group serving until the new one is ready
LWS_ROLLOUT = {"type": "RollingUpdate",
               "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1}}
# The StatefulSet's single template serves every rank: node 0 serves HTTP, the others run headless.
_STS_WRAPPER = ('if [ "$' + NODE_RANK_ENV + '" != 0 ]; then set -- "$@" --headless; fi; '
                'exec kubeinfer "$@"')
_STS_HEALTH = ('test "$' + NODE_RANK_ENV + '" != 0 || python -c "import urllib.request; '
               f"urllib.request.urlopen('http://127.0.0.1:{podspec.PORT}/health', timeout=4)\"")


def node_secret_name(name: str) -> str:
    return f"{name}-node-secret"


def node_secret(spec: InferenceServiceSpec, labels: dict, value: str) -> dict:
    """The Secret the nodes of every group authenticate with; `value` comes from the caller (random,
    made once), so rendering stays pure."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": node_secret_name(spec.name), "namespace": spec.namespace,
                         "labels": dict(labels)},
            "stringData": {NODE_SECRET_KEY: value}}


def node_flags(spec: InferenceServiceSpec, rank: str, master_addr: str) -> list[str]:
    """The engine's multi-node flags (--headless is added by the caller where the rank is known)."""
    return ["--nnodes", str(spec.pipeline), "--node-rank", rank, "--master-addr", master_addr,
            "--master-port", str(MASTER_PORT)]


def _field_env(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _secret_env(spec: InferenceServiceSpec) -> dict:
    return {"name": NODE_SECRET_ENV, "valueFrom": {"secretKeyRef": {
        "name": node_secret_name(spec.name), "key": NODE_SECRET_KEY}}}


def _dist_ports() -> list[dict]:
    return [{"name": "dist", "containerPort": MASTER_PORT, "protocol": "TCP"},
            {"name": "dist-calls", "containerPort": MASTER_PORT + 1, "protocol": "TCP"}]


def _template(spec: InferenceServiceSpec, labels: dict, env: list[dict]) -> dict:
    template = podspec.pod_template(spec, labels, [_secret_env(spec), *env])
    c = template["spec"]["containers"][0]
    c["ports"] = [p for p in c["ports"] if p["name"] == "http"] + _dist_ports()
    return template


def lws_templates(spec: InferenceServiceSpec, labels: dict) -> tuple[dict, dict]:
    """(leaderTemplate, workerTemplate) of a LeaderWorkerSet, without the template-hash label."""
    leader = _template(spec, labels, [_field_env(POD_IP_ENV, "status.podIP")])
    leader["spec"]["containers"][0]["args"] += node_flags(spec, "0", f"$({POD_IP_ENV})")
    worker = _template(spec, labels, [])
    worker["metadata"]["annotations"] = {}   # no /metrics to scrape on a headless node
    c = worker["spec"]["containers"][0]
    c["args"] += ["--headless", *node_flags(spec, f"$({LWS_WORKER_INDEX})", f"$({LWS_LEADER_ADDRESS})")]
    c["ports"] = _dist_ports()
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle"):
        c.pop(key, None)   # no API server to probe or drain; the group restarts when one exits
    return leader, worker


def lws_spec(spec: InferenceServiceSpec, leader: dict, worker: dict) -> dict:
    return {
        "replicas": spec.replicas,
        "startupPolicy": "LeaderCreated",
        "rolloutStrategy": copy.deepcopy(LWS_ROLLOUT),
        "leaderWorkerTemplate": {"size": spec.pipeline,
                                 "restartPolicy": "RecreateGroupOnPodRestart",
                                 "leaderTemplate": leader, "workerTemplate": worker},
    }


def lws_annotations(spec: InferenceServiceSpec) -> dict:
    return {LWS_EXCLUSIVE_TOPOLOGY: spec.exclusive_topology} if spec.exclusive_topology else {}


def statefulset_template(spec: InferenceServiceSpec, labels: dict, rank_label: str,
                         leader_address: str) -> dict:
    """The one template of a group's StatefulSet: rank from `rank_label`, node 0 at `leader_address`."""
    template = _template(spec, labels, [_field_env(NODE_RANK_ENV, f"metadata.labels['{rank_label}']")])
    c = template["spec"]["containers"][0]
    c["command"] = ["/bin/sh", "-c", _STS_WRAPPER, "kubeinfer"]
    c["args"] += node_flags(spec, f"$({NODE_RANK_ENV})", leader_address)
    for key in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[key]
        del probe["httpGet"]
        probe["exec"] = {"command": ["/bin/sh", "-c", _STS_HEALTH]}
    return template


def statefulset_affinity(spec: InferenceServiceSpec, group_labels: dict, selector: dict) -> dict:
    """exclusiveTopology for the StatefulSets, as LWS does it: a group's pods share one domain of
    the topology key, and no other group of this InferenceService lands in it."""
    key = spec.exclusive_topology
    if not key:
        return {}
    group = {"labelSelector": {"matchLabels": dict(group_labels)}, "topologyKey": key}
    others = {"labelSelector": {"matchLabels": dict(selector), "matchExpressions": [
        {"key": k, "operator": "NotIn", "values": [v]} for k, v in group_labels.items()
        if k not in selector]}, "topologyKey": key}
    return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [group]},
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [others]}}
