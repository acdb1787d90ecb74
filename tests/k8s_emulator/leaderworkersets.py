"""A minimal LeaderWorkerSet controller (leaderworkerset.x-k8s.io/v1), active once the LWS CRD is
installed (crds/leaderworkerset.yaml, `install_leaderworkerset_crd`).

Per LeaderWorkerSet NAME and group G < spec.replicas it keeps `size` pods, owned by the
LeaderWorkerSet: the leader NAME-G from leaderTemplate (or workerTemplate when none) and workers
NAME-G-1 .. NAME-G-(size-1) from workerTemplate, with LWS's labels (name, group-index,
worker-index, template-revision-hash), the size annotation and LWS's env in every container
(LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX), as LWS's pod webhook injects them.

- LWS_LEADER_ADDRESS is 127.0.0.1, not NAME-G.NAME.NAMESPACE: the emulator has no DNS and every
  stand-in pod is a local process.
- Group ports: a group's pods meet on ports that must be the same in every pod (node 0's
  --master-port), but the stand-in kubelet gives each pod free local ports. So each group gets one
  local port per containerPort declared in its templates (consecutive container ports get
  consecutive local ports: the engine uses master-port + 1 too), written to every pod of the group
  as the annotation GROUP_PORTS; the kubelet rewrites `--port`/`--master-port N` and env values N
  to them (podenv.remap_ports).
- restartPolicy RecreateGroupOnPodRestart: a group with a pod missing or being deleted, a
  container restarted (restartCount > 0) or a pod Failed has all its pods deleted; once they are
  gone the group is created afresh (with new ports). Other policies replace only missing pods.
- Rollouts (rolloutStrategy.rollingUpdateConfiguration): a changed template first adds maxSurge
  groups (indices replicas ..) with the new one, then recreates outdated groups from the highest
  index down while at least replicas - maxUnavailable groups stay ready; the surge groups go once
  every group below replicas is updated and ready. So maxSurge 1 keeps a one-replica set serving.
  Other groups with index >= replicas are deleted. (No partition.)
- status: replicas (groups with pods), readyReplicas (groups with `size` ready pods),
  updatedReplicas, hpaPodSelector, conditions Available and Progressing.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import socket
from pathlib import Path
from typing import Any

import yaml

from .admission import now
from .controllers import _owner_ref, is_pod_ready, template_hash
from .errors import ApiError
from .reconcile_loop import reconcile_loop
from .store import Store

log = logging.getLogger(__name__)
GROUP, VERSION, PLURAL = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
LABEL_PREFIX = "leaderworkerset.sigs.k8s.io/"
NAME, GROUP_INDEX = LABEL_PREFIX + "name", LABEL_PREFIX + "group-index"
WORKER_INDEX, REVISION = LABEL_PREFIX + "worker-index", LABEL_PREFIX + "template-revision-hash"
SIZE = LABEL_PREFIX + "size"
GROUP_PORTS = "k8s-emulator.kubeinfer.io/group-ports"   # {"containerPort": localPort}
CRD_FILE = Path(__file__).parent / "crds" / "leaderworkerset.yaml"


def install_leaderworkerset_crd(store: Store) -> None:
    """Serve leaderworkerset.x-k8s.io/v1 (what installing LWS does first)."""
    rt = store.registry.lookup("apiextensions.k8s.io", "v1", "customresourcedefinitions")
    store.create(rt, None, yaml.safe_load(CRD_FILE.read_text()))


def _free_run(count: int) -> int:
    """A local port P with P .. P + count - 1 all free now."""
    while True:
        socks = []
        try:
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            socks.append(first)
            base = first.getsockname()[1]
            for offset in range(1, count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def group_ports(templates: list[dict[str, Any]]) -> dict[str, int]:
    """One local port per declared containerPort; runs of consecutive ports stay consecutive."""
    declared = sorted({int(p["containerPort"]) for t in templates
                       for c in (t.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []})
    out: dict[str, int] = {}
    i = 0
    while i < len(declared):
        j = i
        while j + 1 < len(declared) and declared[j + 1] == declared[j] + 1:
            j += 1
        base = _free_run(j - i + 1)
        for k in range(i, j + 1):
            out[str(declared[k])] = base + (k - i)
        i = j + 1
    return out


class LeaderWorkerSetController:
    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self.pods = store.registry.lookup("", "v1", "pods")

    @property
    def lws_type(self) -> Any:
        return self.store.registry.lookup(GROUP, VERSION, PLURAL)

    async def run(self) -> None:
        await reconcile_loop(self.store, {(GROUP, PLURAL), ("", "pods")}, self.interval,
                             self.reconcile_all, "LeaderWorkerSet")

    def reconcile_all(self) -> None:
        rt = self.lws_type
        if rt is None:
            return
        for lws in self.store.items(rt):
            if not lws["metadata"].get("deletionTimestamp"):
                self._reconcile(rt, lws)

    def _reconcile(self, rt: Any, lws: dict[str, Any]) -> None:
        ns, name = lws["metadata"]["namespace"], lws["metadata"]["name"]
        spec = lws["spec"]
        lwt = spec["leaderWorkerTemplate"]
        size, replicas = int(lwt.get("size", 1)), int(spec.get("replicas", 1))
        leader_t = lwt.get("leaderTemplate") or lwt["workerTemplate"]
        worker_t = lwt["workerTemplate"]
        revision = template_hash({"leader": leader_t, "worker": worker_t})
        recreate = lwt.get("restartPolicy", "RecreateGroupOnPodRestart") == "RecreateGroupOnPodRestart"
        pods = [p for p in self.store.items(self.pods, ns)
                if (p["metadata"].get("labels") or {}).get(NAME) == name
                and any(r.get("uid") == lws["metadata"]["uid"] for r in p["metadata"].get("ownerReferences") or [])]
        groups: dict[int, list[dict[str, Any]]] = {}
        for pod in pods:
            groups.setdefault(int(pod["metadata"]["labels"].get(GROUP_INDEX, "0")), []).append(pod)
        rolling = (spec.get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
        surge = _count(rolling.get("maxSurge", 0), replicas, round_up=True)
        unavailable = _count(rolling.get("maxUnavailable", 1), replicas, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1   # LWS refuses both 0; never stall here

        def active(g: int) -> list[dict[str, Any]]:
            return [p for p in groups.get(g, []) if not p["metadata"].get("deletionTimestamp")]

        def ready(g: int) -> bool:
            return len(active(g)) >= size and all(map(is_pod_ready, active(g)))

        outdated = [g for g in range(replicas)
                    if any(p["metadata"]["labels"].get(REVISION) != revision for p in active(g))]
        bursting = any(g >= replicas and active(g) for g in groups)
        # surge groups (indices replicas ..) with the new template, kept until the rest is updated and ready
        limit = replicas + surge if outdated or (bursting and not all(map(ready, range(replicas)))) else replicas
        for g in range(limit):
            members, live = groups.get(g, []), active(g)
            if not members:
                self._create_group(lws, g, size, leader_t, worker_t, revision)
            elif len(live) < size or any(_restarted(p) for p in live):
                if recreate:
                    self._delete(live)
                    groups[g] = []
                elif len(members) == len(live):
                    self._create_group(lws, g, size, leader_t, worker_t, revision,
                                       only_missing={p["metadata"]["name"] for p in live})
        ready_now = sum(1 for g in range(limit) if ready(g))
        for g in sorted(outdated, reverse=True):   # LWS updates from the highest index down
            if ready_now - ready(g) < replicas - unavailable:
                break
            ready_now -= ready(g)
            self._delete(active(g))
            groups[g] = []
        for g in list(groups):
            if g >= limit:
                self._delete(active(g))
        self._write_status(rt, lws, groups, size, replicas, revision)

    def _create_group(self, lws: dict[str, Any], g: int, size: int, leader_t: dict[str, Any],
                      worker_t: dict[str, Any], revision: str, only_missing: set[str] | None = None) -> None:
        ns, name = lws["metadata"]["namespace"], lws["metadata"]["name"]
        ports = json.dumps(group_ports([leader_t, worker_t]))
        for index in range(size):
            pod_name = f"{name}-{g}" if index == 0 else f"{name}-{g}-{index}"
            if only_missing is not None and pod_name in only_missing:
                continue
            template = copy.deepcopy(leader_t if index == 0 else worker_t)
            meta = template.get("metadata") or {}
            labels = {**(meta.get("labels") or {}), NAME: name, GROUP_INDEX: str(g),
                      WORKER_INDEX: str(index), REVISION: revision}
            annotations = {**(meta.get("annotations") or {}), SIZE: str(size), GROUP_PORTS: ports}
            pod_spec = template["spec"]
            lws_env = [{"name": "LWS_LEADER_ADDRESS", "value": "127.0.0.1"},
                       {"name": "LWS_GROUP_SIZE", "value": str(size)},
                       {"name": "LWS_WORKER_INDEX", "value": str(index)}]
            for c in pod_spec.get("containers") or []:
                c["env"] = lws_env + [e for e in c.get("env") or [] if e.get("name") not in
                                      {v["name"] for v in lws_env}]
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": pod_name, "namespace": ns, "labels": labels,
                                "annotations": annotations, "ownerReferences": [_owner_ref(lws)]},
                   "spec": pod_spec}
            try:
                self.store.create(self.pods, ns, pod)
            except ApiError as e:
                if e.code != 409:   # a pod of that name still terminating: next round
                    raise

    def _delete(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            try:
                self.store.delete(self.pods, pod["metadata"]["namespace"], pod["metadata"]["name"])
            except ApiError as e:
                if e.code != 404:
                    raise

    def _write_status(self, rt: Any, lws: dict[str, Any], groups: dict[int, list[dict[str, Any]]], size: int,
                      replicas: int, revision: str) -> None:
        live = {g: [p for p in members if not p["metadata"].get("deletionTimestamp")]
                for g, members in groups.items() if g < replicas}
        ready = sum(1 for members in live.values() if len(members) >= size and all(map(is_pod_ready, members)))
        updated = sum(1 for members in live.values()
                      if members and all(p["metadata"]["labels"].get(REVISION) == revision for p in members))
        old = {c.get("type"): c for c in (lws.get("status") or {}).get("conditions") or []}

        def condition(kind: str, ok: bool, reason: str) -> dict[str, Any]:
            status = "True" if ok else "False"
            if old.get(kind, {}).get("status") == status:
                return old[kind]
            return {"type": kind, "status": status, "reason": reason, "message": "",
                    "lastTransitionTime": now()}

        status = {"replicas": len([m for m in live.values() if m]), "readyReplicas": ready,
                  "updatedReplicas": updated,
                  "hpaPodSelector": f"{NAME}={lws['metadata']['name']},{WORKER_INDEX}=0",
                  "conditions": [condition("Available", ready >= replicas, "AllGroupsReady"),
                                 condition("Progressing", ready < replicas, "GroupsProgressing")]}
        if status == {k: v for k, v in (lws.get("status") or {}).items()}:
            return

        def mutate(current: dict[str, Any]) -> dict[str, Any]:
            current["status"] = status
            return current
        try:
            self.store.update(rt, lws["metadata"]["namespace"], lws["metadata"]["name"], mutate, "status")
        except ApiError as e:
            if e.code != 404:
                raise


def _count(value: Any, total: int, round_up: bool) -> int:
    """An int-or-percent of `total` (maxSurge rounds up, maxUnavailable down, as LWS)."""
    if isinstance(value, str) and value.endswith("%"):
        exact = total * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value or 0)


def _restarted(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Failed" or any(
        int(c.get("restartCount") or 0) > 0 for c in status.get("containerStatuses") or [])
