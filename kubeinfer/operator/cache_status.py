"""Pure: the ModelCached condition of an InferenceService with a download-once cache, from what its
download Job, the Job's pods and the cache claim report, and the phase it gives while the engine
pods are held back.

    ModelCached  True   Cached          the Job succeeded: the folder is complete (marker written last)
                 False  Downloading     the Job runs (attempt, start time, the last progress line of
                                        its log) or waits for its claim or its pod to be scheduled
                 False  DownloadFailed  the Job failed (backoffLimit or activeDeadlineSeconds): its
                                        reason and the download's own last words
                 False  ClaimNotFound   spec.model.cache.pvc names no claim

Until ModelCached is True the workload is not created (reconcile.py), so the phase is Downloading
(Failed once the download failed) and Ready carries the same reason. A workload that exists already
(a model or revision changed while pods serve the old one) keeps serving and its phase stands.
"""
from __future__ import annotations

from dataclasses import dataclass

from kubeinfer.operator import model_cache
from kubeinfer.operator.download_job import BACKOFF_LIMIT
from kubeinfer.operator.spec import InferenceServiceSpec
from kubeinfer.operator.status import _condition, pod_problem

CACHED, DOWNLOADING, FAILED = "Cached", "Downloading", "DownloadFailed"
CLAIM_NOT_FOUND = "ClaimNotFound"


@dataclass(frozen=True)
class CacheState:
    reason: str        # Cached | Downloading | DownloadFailed | ClaimNotFound
    message: str

    @property
    def ready(self) -> bool:
        return self.reason == CACHED


def _job_condition(job: dict, kind: str) -> dict | None:
    return next((c for c in (job.get("status") or {}).get("conditions") or []
                 if c.get("type") == kind and c.get("status") == "True"), None)


def _said(pod: dict) -> str:
    """The download's termination message (its summary or error), newest container state first."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            message = (state.get("terminated") or {}).get("message", "").strip()
            if message:
                lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
                return " ".join(lines[-3:])[:600]
    return ""


def _newest(pods: list[dict]) -> list[dict]:
    return sorted(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp", ""), reverse=True)


def cache_state(spec: InferenceServiceSpec, job: dict | None, claim: dict | None, pods: list[dict],
                progress: str = "") -> CacheState:
    """`job`: the desired download Job as observed (None: not there yet); `claim`: the cache PVC
    (None: not found); `pods`: the Job's pods; `progress`: the running download's last log line."""
    claim_name = model_cache.claim_name(spec)
    where = f"{spec.model.uri}@{spec.model.revision} in PersistentVolumeClaim {claim_name} " \
            f"({model_cache.relative_dir(spec)})"
    if claim is None and not spec.model.cache.creates_claim:
        return CacheState(CLAIM_NOT_FOUND, (
            f"spec.model.cache.pvc names PersistentVolumeClaim {claim_name}, which does not exist in "
            f"namespace {spec.namespace}: create it (ReadWriteMany, larger than the model), or set "
            "storageClass and size instead of pvc and the operator creates one"))
    modes = ((claim or {}).get("status") or {}).get("accessModes") or ((claim or {}).get("spec") or {}).get(
        "accessModes") or []
    if claim is not None and modes and "ReadWriteMany" not in modes:
        # a ReadWriteOnce claim works while every pod lands on the node that has it mounted
        where += f" (the claim is {', '.join(modes)}, not ReadWriteMany: pods on other nodes cannot mount it)"
    if job is None:
        return CacheState(DOWNLOADING, f"creating the download Job for {where}")
    name = job["metadata"]["name"]
    pods = _newest(pods)
    if _job_condition(job, "Complete"):
        said = next((s for s in map(_said, pods) if s), "")
        return CacheState(CACHED, f"{where}: {said or 'downloaded'}")
    failed = _job_condition(job, "Failed")
    if failed:
        said = next((s for s in map(_said, pods) if s), "no message")
        return CacheState(FAILED, (
            f"download Job {name} failed ({failed.get('reason', 'Failed')}: "
            f"{failed.get('message', '').rstrip('.')}); the download said: {said}. Check "
            "spec.model.uri, spec.model.revision and spec.model.credentialsSecretRef (gated models "
            f"need a token), and the claim's free space; delete Job {name} to try again"))
    status = job.get("status") or {}
    attempt = int(status.get("failed") or 0) + 1
    parts = [f"downloading {where}: Job {name}, attempt {attempt} of {BACKOFF_LIMIT + 1}"]
    if status.get("startTime"):
        parts[0] += f", started {status['startTime']}"
    if claim is not None and (claim.get("status") or {}).get("phase") == "Pending":
        parts.append(f"claim {claim_name} is not bound yet (its storage class must provide "
                     "ReadWriteMany volumes; `kubectl describe pvc " + claim_name + "`)")
    problem = next((p for p in map(lambda pod: pod_problem(pod, spec), pods[:1]) if p), None)
    if problem is not None and problem.reason != "CrashLoop":
        parts.append(problem.message)
    if attempt > 1:
        said = next((s for s in map(_said, pods) if s), "")
        if said:
            parts.append(f"the last attempt failed: {said}")
    parts.append(progress or "no progress reported yet")
    return CacheState(DOWNLOADING, "; ".join(parts))


def with_cache(status: dict, state: CacheState, *, held: bool, generation: int, previous: dict | None,
               now: str) -> dict:
    """`status` with the ModelCached condition; while the workload is `held` (not created until
    the cache is ready) the phase and the Ready/Progressing/Degraded conditions say why."""
    prev = (previous or {}).get("conditions") or []
    conditions = [c for c in status.get("conditions") or [] if c.get("type") != "ModelCached"]
    conditions.append(_condition("ModelCached", state.ready, state.reason, state.message,
                                 generation, prev, now))
    out = {**status, "conditions": conditions}
    if not held or state.ready:
        return out
    failed = state.reason == FAILED
    problem = failed or state.reason == CLAIM_NOT_FOUND
    out["phase"] = "Failed" if failed else "Downloading"
    by_type = {
        "Ready": _condition("Ready", False, state.reason, state.message, generation, prev, now),
        "Progressing": _condition("Progressing", not failed, state.reason, state.message, generation,
                                  prev, now),
        "Degraded": _condition("Degraded", problem, state.reason if problem else "AsExpected",
                               state.message if problem else "no problems seen", generation, prev, now),
    }
    out["conditions"] = [by_type.get(c["type"], c) for c in conditions]
    return out
