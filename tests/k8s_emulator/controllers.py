"""Minimal kube-controller-manager: Deployment -> ReplicaSet -> Pod, and PodDisruptionBudget status.

The Deployment controller keeps one ReplicaSet per pod template (named DEPLOYMENT-HASH, pods labelled
`pod-template-hash`), rolls with maxSurge/maxUnavailable (or Recreate), and writes the status fields
operators read: observedGeneration, replicas, updatedReplicas, readyReplicas, availableReplicas,
unavailableReplicas and the Available/Progressing conditions. minReadySeconds is not modelled: a ready
pod is available at once. All controllers are level-triggered: every change wakes a full reconcile.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from typing import Any

from .admission import now
from .errors import ApiError
from .selectors import selector_from_label_selector_object
from .reconcile_loop import reconcile_loop
from .store import Store, random_suffix

log = logging.getLogger(__name__)
HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def template_hash(template: dict[str, Any]) -> str:
    digest = int.from_bytes(hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()[:8], "big")
    chars = []
    for _ in range(10):
        digest, index = divmod(digest, len(_ALPHABET))
        chars.append(_ALPHABET[index])
    return "".join(chars)


def is_pod_ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _controlled_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    return any(ref.get("controller") and ref.get("uid") == owner["metadata"]["uid"]
               for ref in obj["metadata"].get("ownerReferences") or [])


def _owner_ref(owner: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = total * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value or 0)


def _condition(kind: str, ok: bool, reason: str, message: str, old: list[dict[str, Any]]) -> dict[str, Any]:
    status = "True" if ok else "False"
    previous = next((c for c in old if c.get("type") == kind), None)
    if previous and previous.get("status") == status and previous.get("reason") == reason:
        return previous  # unchanged: keep its timestamps, so the status write is a no-op
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastUpdateTime": now(), "lastTransitionTime": now()}


class Controllers:
    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        registry = store.registry
        self.deployments = registry.lookup("apps", "v1", "deployments")
        self.replicasets = registry.lookup("apps", "v1", "replicasets")
        self.pods = registry.lookup("", "v1", "pods")
        self.pdbs = registry.lookup("policy", "v1", "poddisruptionbudgets")

    async def run(self) -> None:
        await reconcile_loop(self.store, {("apps", "deployments"), ("apps", "replicasets"), ("", "pods"),
                                     ("policy", "poddisruptionbudgets")}, self.interval,
                             self.reconcile_all, "controller")

    def reconcile_all(self) -> None:
        for dep in self.store.items(self.deployments):
            if not dep["metadata"].get("deletionTimestamp"):
                self._reconcile_deployment(dep)
        for rs in self.store.items(self.replicasets):
            if not rs["metadata"].get("deletionTimestamp"):
                self._reconcile_replicaset(rs)
        for pdb in self.store.items(self.pdbs):
            self._reconcile_pdb(pdb)

    # ---- pods of a ReplicaSet ----
    def _pods_of(self, rs: dict[str, Any], all_pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [p for p in all_pods if _controlled_by(p, rs)]

    def _reconcile_replicaset(self, rs: dict[str, Any]) -> None:
        ns = rs["metadata"]["namespace"]
        owned = self._pods_of(rs, self.store.items(self.pods, ns))
        active = [p for p in owned if not p["metadata"].get("deletionTimestamp")
                  and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        wanted = int(rs["spec"].get("replicas", 1))
        template = rs["spec"]["template"]
        for _ in range(wanted - len(active)):
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {**copy.deepcopy(template.get("metadata") or {}),
                                "name": f"{rs['metadata']['name']}-{random_suffix()}", "namespace": ns,
                                "ownerReferences": [_owner_ref(rs)]},
                   "spec": copy.deepcopy(template["spec"])}
            self.store.create(self.pods, ns, pod)
        if len(active) > wanted:
            # delete the least useful first: not scheduled, not ready, newest
            ranked = sorted(active, key=lambda p: (bool((p.get("spec") or {}).get("nodeName")), is_pod_ready(p),
                                                   _neg(p["metadata"]["creationTimestamp"])))
            for pod in ranked[:len(active) - wanted]:
                try:
                    self.store.delete(self.pods, ns, pod["metadata"]["name"])
                except ApiError as e:
                    if e.code != 404:
                        raise
        ready = sum(1 for p in active if is_pod_ready(p))
        status = {"replicas": len(active), "fullyLabeledReplicas": len(active), "readyReplicas": ready,
                  "availableReplicas": ready, "observedGeneration": rs["metadata"]["generation"]}
        self._write_status(self.replicasets, rs, status)

    def _write_status(self, rt: Any, obj: dict[str, Any], status: dict[str, Any]) -> None:
        def mutate(current: dict[str, Any]) -> dict[str, Any]:
            current["status"] = status
            return current
        try:
            self.store.update(rt, obj["metadata"].get("namespace"), obj["metadata"]["name"], mutate, "status")
        except ApiError as e:
            if e.code != 404:
                raise

    # ---- Deployments ----
    def _reconcile_deployment(self, dep: dict[str, Any]) -> None:
        ns = dep["metadata"]["namespace"]
        spec = dep["spec"]
        desired = int(spec.get("replicas", 1))
        template = spec["template"]
        h = template_hash(template)
        owned = [rs for rs in self.store.items(self.replicasets, ns) if _controlled_by(rs, dep)]
        new_rs = next((rs for rs in owned if rs["metadata"].get("labels", {}).get(HASH_LABEL) == h), None)
        old_rss = [rs for rs in owned if rs is not new_rs]
        revisions = [int(rs["metadata"].get("annotations", {}).get(REVISION, "0")) for rs in owned]
        if new_rs is None:
            new_rs = self._create_replicaset(dep, h, max(revisions, default=0) + 1, 0 if old_rss else desired)
            if new_rs is None:
                return
        all_pods = [p for p in self.store.items(self.pods, ns) if not p["metadata"].get("deletionTimestamp")]

        def available(rs: dict[str, Any]) -> int:
            return sum(1 for p in self._pods_of(rs, all_pods) if is_pod_ready(p))

        strategy = spec.get("strategy") or {}
        if strategy.get("type") == "Recreate":
            for rs in old_rss:
                self._scale(rs, 0)
            old_pods = [p for rs in old_rss for p in self.store.items(self.pods, ns) if _controlled_by(p, rs)]
            self._scale(new_rs, desired if not old_pods else 0)
        else:
            rolling = strategy.get("rollingUpdate") or {}
            surge = _int_or_percent(rolling.get("maxSurge", "25%"), desired, round_up=True)
            unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), desired, round_up=False)
            if surge == 0 and unavailable == 0:
                unavailable = 1
            total = sum(int(rs["spec"].get("replicas", 0)) for rs in owned)
            target = int(new_rs["spec"].get("replicas", 0))
            if not old_rss:
                target = desired
            elif target < desired:
                target = min(desired, target + max(0, desired + surge - total))
            self._scale(new_rs, min(target, desired))
            can_remove = sum(available(rs) for rs in owned) - (desired - unavailable)
            for rs in sorted(old_rss, key=lambda r: r["metadata"]["creationTimestamp"]):
                replicas = int(rs["spec"].get("replicas", 0))
                replicas -= max(0, replicas - available(rs))  # unhealthy old replicas go first, for free
                removable = max(0, min(replicas, can_remove))
                can_remove -= removable
                self._scale(rs, replicas - removable)
        # old ReplicaSets beyond revisionHistoryLimit would be pruned; empty ones are harmless here
        self._deployment_status(dep, new_rs, owned, all_pods, desired, h)

    def _create_replicaset(self, dep: dict[str, Any], h: str, revision: int, replicas: int) -> dict[str, Any] | None:
        ns, name = dep["metadata"]["namespace"], dep["metadata"]["name"]
        template = copy.deepcopy(dep["spec"]["template"])
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = h
        selector = copy.deepcopy(dep["spec"]["selector"])
        selector.setdefault("matchLabels", {})[HASH_LABEL] = h
        rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
              "metadata": {"name": f"{name}-{h}", "namespace": ns, "labels": template["metadata"]["labels"],
                           "annotations": {REVISION: str(revision),
                                           "deployment.kubernetes.io/desired-replicas": str(replicas)},
                           "ownerReferences": [_owner_ref(dep)]},
              "spec": {"replicas": replicas, "selector": selector, "template": template}}
        try:
            created = self.store.create(self.replicasets, ns, rs)
        except ApiError as e:
            if e.code == 409:  # a ReplicaSet of a deleted Deployment of that name: the GC removes it soon
                return None
            raise
        self.store.update(self.deployments, ns, name, lambda d: _annotate(d, REVISION, str(revision)))
        return created

    def _scale(self, rs: dict[str, Any], replicas: int) -> None:
        if int(rs["spec"].get("replicas", 0)) != replicas:
            def mutate(current: dict[str, Any]) -> dict[str, Any]:
                current["spec"]["replicas"] = replicas
                return current
            self.store.update(self.replicasets, rs["metadata"]["namespace"], rs["metadata"]["name"], mutate)

    def _deployment_status(self, dep: dict[str, Any], new_rs: dict[str, Any], owned: list[dict[str, Any]],
                           pods: list[dict[str, Any]], desired: int, h: str) -> None:
        owned_pods = [p for rs in owned for p in self._pods_of(rs, pods)]
        new_pods = self._pods_of(new_rs, pods)
        ready = sum(1 for p in owned_pods if is_pod_ready(p))
        rolling = (dep["spec"].get("strategy") or {}).get("rollingUpdate") or {}
        max_unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), desired, round_up=False)
        complete = len(new_pods) == desired == len(owned_pods) and all(is_pod_ready(p) for p in new_pods)
        old = (dep.get("status") or {}).get("conditions") or []
        status = {
            "observedGeneration": dep["metadata"]["generation"], "replicas": len(owned_pods),
            "updatedReplicas": len(new_pods), "readyReplicas": ready, "availableReplicas": ready,
            "unavailableReplicas": max(0, desired - ready),
            "conditions": [
                _condition("Available", ready >= desired - max_unavailable,
                           "MinimumReplicasAvailable" if ready >= desired - max_unavailable
                           else "MinimumReplicasUnavailable", "Deployment has minimum availability.", old),
                _condition("Progressing", True, "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                           f'ReplicaSet "{new_rs["metadata"]["name"]}" '
                           f'{"has successfully progressed" if complete else "is progressing"}.', old),
            ]}
        for key in ("readyReplicas", "availableReplicas", "unavailableReplicas", "updatedReplicas", "replicas"):
            if not status[key]:
                del status[key]  # the API server omits zero counts
        self._write_status(self.deployments, dep, status)

    # ---- PodDisruptionBudgets ----
    def _reconcile_pdb(self, pdb: dict[str, Any]) -> None:
        matches = selector_from_label_selector_object(pdb["spec"].get("selector"))
        pods = [p for p in self.store.items(self.pods, pdb["metadata"]["namespace"])
                if matches(p["metadata"].get("labels") or {}) and not p["metadata"].get("deletionTimestamp")]
        expected, healthy = len(pods), sum(1 for p in pods if is_pod_ready(p))
        spec = pdb["spec"]
        if "minAvailable" in spec:
            desired = _int_or_percent(spec["minAvailable"], expected, round_up=True)
        else:
            desired = expected - _int_or_percent(spec.get("maxUnavailable", 0), expected, round_up=True)
        allowed = max(0, healthy - desired)
        old = (pdb.get("status") or {}).get("conditions") or []
        self._write_status(self.pdbs, pdb, {
            "observedGeneration": pdb["metadata"]["generation"], "expectedPods": expected,
            "currentHealthy": healthy, "desiredHealthy": max(0, desired), "disruptionsAllowed": allowed,
            "conditions": [_condition("DisruptionAllowed", allowed > 0,
                                      "SufficientPods" if allowed > 0 else "InsufficientPods", "", old)]})


def _annotate(obj: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    obj["metadata"].setdefault("annotations", {})[key] = value
    return obj


def _neg(timestamp: str) -> str:
    """Sort key for newest first."""
    return "".join(chr(0x10FFFF - ord(c)) for c in timestamp)
