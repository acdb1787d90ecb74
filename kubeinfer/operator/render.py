"""Pure: an InferenceService spec -> the manifests the operator applies.

    pipeline == 1        Deployment NAME, Service NAME, PodDisruptionBudget NAME
    pipeline > 1, LWS    LeaderWorkerSet NAME-workers (one group of `pipeline` pods per replica),
                         Service NAME (leaders only), PodDisruptionBudget NAME
    pipeline > 1, no LWS StatefulSet NAME-G per replica G (`pipeline` pods, started in parallel),
                         headless Service NAME-workers, Service NAME (rank-0 pods), PDB NAME
    pipeline > 1         + Secret NAME-node-secret, created once by reconcile.py (not rendered here:
                         its value is random), multinode.node_secret

The multi-node pods themselves (flags, ranks, probes, the node secret's env) are multinode.py's.

With spec.model.cache pvc or storageClass, the cache's PersistentVolumeClaim NAME-model-cache (only
when the operator creates it) and the download Job NAME-download-HASH come first (model_cache.py,
download_job.py); reconcile.py holds the workloads back until the Job succeeded.

With spec.router inference-pool, an InferencePool NAME (Gateway API Inference Extension,
inference.networking.k8s.io/v1) follows, selecting the pods that serve HTTP, when the cluster
serves that kind (reconcile.py asks).

Every object carries the labels below, the annotation kubeinfer.io/spec-hash (what plan compares)
and, given an owner, a controller ownerReference, so deleting the InferenceService deletes them.
Pod templates carry kubeinfer.io/template-hash, a hash of the template, so a change rolls out.
"""
from __future__ import annotations

import copy
import hashlib
import json

from kubeinfer.operator import model_cache, multinode, podspec
from kubeinfer.operator.download_job import download_job
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import API_VERSION, KIND, InferenceServiceSpec
from kubeinfer.operator.traffic import ROUTER_INFERENCE_POOL

LABEL_NAME, APP = "app.kubernetes.io/name", "kubeinfer"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY, MANAGER = "app.kubernetes.io/managed-by", "kubeinfer-operator"
LABEL_IS = "kubeinfer.io/inferenceservice"
LABEL_HASH = "kubeinfer.io/template-hash"
LABEL_GROUP = "kubeinfer.io/group"
ANNOTATION_SPEC_HASH = "kubeinfer.io/spec-hash"
STS_POD_INDEX = "apps.kubernetes.io/pod-index"            # set by the StatefulSet controller (1.28+)
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"


def stable_hash(obj: object, length: int = 16) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:length]


def selector_labels(name: str) -> dict[str, str]:
    """The labels every engine pod of NAME has; immutable selectors use only these."""
    return {LABEL_NAME: APP, LABEL_IS: name}


def common_labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), LABEL_INSTANCE: name, LABEL_COMPONENT: "engine",
            LABEL_MANAGED_BY: MANAGER}


def leader_label(spec: InferenceServiceSpec, use_lws: bool) -> dict[str, str]:
    """Extra selector for the pods that serve HTTP: all of them, or rank 0 of each group."""
    if spec.pipeline == 1:
        return {}
    return {LWS_WORKER_INDEX: "0"} if use_lws else {STS_POD_INDEX: "0"}


def selector_string(spec: InferenceServiceSpec, use_lws: bool = False) -> str:
    """status.selector: the pods the scale subresource (HPA, KEDA) counts and reads metrics from."""
    labels = {**selector_labels(spec.name), **leader_label(spec, use_lws)}
    return ",".join(f"{k}={v}" for k, v in labels.items())


def workers_name(name: str) -> str:
    return f"{name}-workers"


def _meta(spec: InferenceServiceSpec, name: str) -> dict:
    return {"name": name, "namespace": spec.namespace, "labels": common_labels(spec.name)}


def _hashed_template(spec: InferenceServiceSpec, labels: dict, extra_env: list[dict]) -> dict:
    template = podspec.pod_template(spec, labels, extra_env)
    template["metadata"]["labels"][LABEL_HASH] = stable_hash(template)
    return template


def deployment(spec: InferenceServiceSpec) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec, spec.name),
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 3,
            # a rollout is "stuck" only after the pods had their whole startup budget
            "progressDeadlineSeconds": podspec.startup_budget_seconds(spec) + 300,
            "selector": {"matchLabels": selector_labels(spec.name)},
            # never drop below the serving capacity; the surge pod may wait for a new GPU node
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": _hashed_template(spec, common_labels(spec.name), []),
        },
    }


def statefulsets(spec: InferenceServiceSpec, settings: OperatorSettings) -> list[dict]:
    """One StatefulSet per replica: `pipeline` pods whose rank is their ordinal (multinode.py)."""
    out = []
    workers = workers_name(spec.name)
    for group in range(spec.replicas):
        name = f"{spec.name}-{group}"
        leader = f"{name}-0.{settings.service_host(workers, spec.namespace)}"
        group_labels = {LABEL_GROUP: str(group)}
        template = multinode.statefulset_template(spec, {**common_labels(spec.name), **group_labels},
                                                  STS_POD_INDEX, leader)
        affinity = multinode.statefulset_affinity(spec, group_labels, selector_labels(spec.name))
        if affinity:
            template["spec"]["affinity"] = {**template["spec"].get("affinity", {}), **affinity}
        template["metadata"]["labels"][LABEL_HASH] = stable_hash(template)
        out.append({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(spec, name),
            "spec": {
                "replicas": spec.pipeline,
                "serviceName": workers,
                # rank 0 waits for its peers: OrderedReady would never start them
                "podManagementPolicy": "Parallel",
                "revisionHistoryLimit": 3,
                "selector": {"matchLabels": {**selector_labels(spec.name), **group_labels}},
                "updateStrategy": {"type": "RollingUpdate"},
                "template": template,
            },
        })
    return out


def leaderworkerset(spec: InferenceServiceSpec) -> dict:
    """One LeaderWorkerSet; LWS names group G's leader NAME-workers-G behind headless NAME-workers.
    Both templates carry one hash, of the pair, so either changing rolls the groups."""
    leader, worker = multinode.lws_templates(spec, common_labels(spec.name))
    digest = stable_hash({"leader": leader, "worker": worker})
    for template in (leader, worker):
        template["metadata"]["labels"][LABEL_HASH] = digest
    meta = _meta(spec, workers_name(spec.name))
    if multinode.lws_annotations(spec):
        meta["annotations"] = multinode.lws_annotations(spec)
    return {"apiVersion": LWS_API_VERSION, "kind": "LeaderWorkerSet", "metadata": meta,
            "spec": multinode.lws_spec(spec, leader, worker)}


def service(spec: InferenceServiceSpec, use_lws: bool = False) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, spec.name),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector_labels(spec.name), **leader_label(spec, use_lws)},
            "ports": [{"name": "http", "port": podspec.PORT, "targetPort": "http", "protocol": "TCP",
                       "appProtocol": "http"}],
        },
    }


def headless_service(spec: InferenceServiceSpec) -> dict:
    """Stable DNS for every pod of the StatefulSets (NAME-G-R.NAME-workers), ready or not."""
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, workers_name(spec.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(spec.name),
            "ports": [{"name": "dist", "port": podspec.DIST_PORT, "targetPort": "dist",
                       "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(spec: InferenceServiceSpec) -> dict:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(spec, spec.name),
        "spec": {
            # one pod at a time, so a node drain never takes every replica; maxUnavailable (rather
            # than minAvailable) still lets a single replica's node drain and scale down
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(spec.name)},
            # pods still loading or crash-looping must not block a drain
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def inference_pool(spec: InferenceServiceSpec, use_lws: bool = False) -> dict:
    """An InferencePool over the pods the Service reaches. Its endpoint picker (EPP) is deployed
    with the inference gateway (the extension's `inferencepool` chart or manifests); the engine
    serves the vllm:* metrics it reads (num_requests_waiting, kv_cache_usage_perc,
    cache_config_info)."""
    pool = spec.traffic.inference_pool
    return {
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": _meta(spec, spec.name),
        "spec": {
            "selector": {"matchLabels": {**selector_labels(spec.name), **leader_label(spec, use_lws)}},
            "targetPorts": [{"number": podspec.PORT}],
            "endpointPickerRef": {"name": pool.endpoint_picker or f"{spec.name}-epp",
                                  "port": {"number": pool.endpoint_picker_port}},
        },
    }


def owner_reference(owner: dict) -> dict:
    """owner: the InferenceService (or its metadata) with name and uid."""
    meta = owner.get("metadata", owner)
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _finish(obj: dict, owner: dict | None) -> dict:
    annotations = obj["metadata"].get("annotations") or {}
    hashed = {"labels": obj["metadata"]["labels"], "spec": obj["spec"]}
    if annotations:
        hashed["annotations"] = annotations
    obj["metadata"]["annotations"] = {**annotations, ANNOTATION_SPEC_HASH: stable_hash(hashed)}
    if owner is not None:
        obj["metadata"]["ownerReferences"] = [owner_reference(owner)]
    return obj


def render(spec: InferenceServiceSpec, settings: OperatorSettings, *, owner: dict | None = None,
           use_lws: bool = False, pools: bool = True) -> list[dict]:
    """The desired children, in apply order. `use_lws` only matters when pipeline > 1; `pools`:
    whether the cluster serves InferencePool (rendered only for spec.router inference-pool)."""
    if spec.pipeline == 1:
        objs = [deployment(spec), service(spec), pod_disruption_budget(spec)]
    elif use_lws:
        objs = [leaderworkerset(spec), service(spec, use_lws=True),
                pod_disruption_budget(spec)]
    else:
        objs = [*statefulsets(spec, settings), headless_service(spec), service(spec),
                pod_disruption_budget(spec)]
    if pools and spec.traffic.router == ROUTER_INFERENCE_POOL:
        objs.append(inference_pool(spec, use_lws))
    out = [_finish(copy.deepcopy(o), owner) for o in objs]
    if model_cache.enabled(spec):
        out = cache_children(spec, owner) + out
    return out


def cache_children(spec: InferenceServiceSpec, owner: dict | None) -> list[dict]:
    """The model cache's claim (when the operator creates it; without an owner when
    reclaimPolicy is Retain, so it outlives the InferenceService) and its download Job."""
    labels = common_labels(spec.name)
    out = []
    claim = model_cache.persistent_volume_claim(spec, labels)
    if claim is not None:
        out.append(_finish(claim, None if spec.model.cache.retain else owner))
    out.append(_finish(download_job(spec, labels), owner))
    return out
