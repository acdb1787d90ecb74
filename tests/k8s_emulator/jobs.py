"""Minimal Job controller: one pod at a time per Job, retried up to backoffLimit, and the status
fields operators read (active, ready, succeeded, failed, startTime, completionTime, conditions
Complete / Failed with the API's reasons BackoffLimitExceeded and DeadlineExceeded).

Pods are named JOB-SUFFIX and labelled job-name, batch.kubernetes.io/job-name and controller-uid as
the real controller does; restartPolicy Never means a failed pod stays and counts as one failure.
Not modelled: parallelism/completions > 1, indexed Jobs, pod failure policies, suspend, TTL.
"""
from __future__ import annotations

import copy
import datetime
import logging
from typing import Any

from .admission import now
from .controllers import _controlled_by, _owner_ref, is_pod_ready
from .errors import ApiError
from .reconcile_loop import reconcile_loop
from .store import Store, random_suffix

log = logging.getLogger(__name__)
FINISHED = ("Succeeded", "Failed")


def _seconds_since(timestamp: str) -> float:
    started = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return (datetime.datetime.now(datetime.UTC) - started).total_seconds()


def _finished(job: dict[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


class JobController:
    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self.jobs = store.registry.lookup("batch", "v1", "jobs")
        self.pods = store.registry.lookup("", "v1", "pods")

    async def run(self) -> None:
        await reconcile_loop(self.store, {("batch", "jobs"), ("", "pods")}, self.interval,
                             self.reconcile_all, "job controller")

    def reconcile_all(self) -> None:
        for job in self.store.items(self.jobs):
            if not job["metadata"].get("deletionTimestamp") and not _finished(job):
                self._reconcile(job)

    def _reconcile(self, job: dict[str, Any]) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        spec, status = job["spec"], dict(job.get("status") or {})
        pods = [p for p in self.store.items(self.pods, ns) if _controlled_by(p, job)]
        phases = [(p.get("status") or {}).get("phase") for p in pods]
        active = [p for p, ph in zip(pods, phases)
                  if ph not in FINISHED and not p["metadata"].get("deletionTimestamp")]
        failed, succeeded = phases.count("Failed"), phases.count("Succeeded")
        status.setdefault("startTime", now())
        conditions: list[dict[str, Any]] = []
        deadline = spec.get("activeDeadlineSeconds")
        if succeeded:
            status["completionTime"] = now()
            done = "Reached expected number of succeeded pods"
            conditions = [self._condition("SuccessCriteriaMet", "CompletionsReached", done),
                          self._condition("Complete", "CompletionsReached", done)]
        elif failed > int(spec.get("backoffLimit", 6)):
            said = "Job has reached the specified backoff limit"
            conditions = [self._condition("FailureTarget", "BackoffLimitExceeded", said),
                          self._condition("Failed", "BackoffLimitExceeded", said)]
        elif deadline is not None and _seconds_since(status["startTime"]) > int(deadline):
            said = "Job was active longer than specified deadline"
            conditions = [self._condition("Failed", "DeadlineExceeded", said)]
            for pod in active:
                self._delete(ns, pod["metadata"]["name"])
            active = []
        elif not active:
            self._create_pod(job)
            active = [None]
        status.update(active=len(active), failed=failed, succeeded=succeeded,
                      ready=sum(1 for p in active if p is not None and is_pod_ready(p)))
        if conditions:
            status["conditions"] = conditions
        for key in ("active", "failed", "succeeded", "ready"):
            if not status[key]:
                del status[key]   # the API server omits zero counts
        if status != job.get("status"):
            def mutate(current: dict[str, Any]) -> dict[str, Any]:
                current["status"] = status
                return current
            try:
                self.store.update(self.jobs, ns, name, mutate, "status")
            except ApiError as e:
                if e.code != 404:
                    raise

    @staticmethod
    def _condition(kind: str, reason: str, message: str) -> dict[str, Any]:
        return {"type": kind, "status": "True", "reason": reason, "message": message,
                "lastProbeTime": now(), "lastTransitionTime": now()}

    def _create_pod(self, job: dict[str, Any]) -> None:
        ns, name, uid = job["metadata"]["namespace"], job["metadata"]["name"], job["metadata"]["uid"]
        template = copy.deepcopy(job["spec"]["template"])
        meta = template.get("metadata") or {}
        labels = {**(meta.get("labels") or {}), "job-name": name, "batch.kubernetes.io/job-name": name,
                  "controller-uid": uid, "batch.kubernetes.io/controller-uid": uid}
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {**meta, "name": f"{name}-{random_suffix()}", "namespace": ns, "labels": labels,
                            "ownerReferences": [_owner_ref(job)]},
               "spec": template["spec"]}
        self.store.create(self.pods, ns, pod)

    def _delete(self, ns: str, name: str) -> None:
        try:
            self.store.delete(self.pods, ns, name)
        except ApiError as e:
            if e.code != 404:
                raise
