"""Reads what the ModelCached condition needs from the API: the download Job, the cache claim, the
Job's pods and, while it runs, the last `progress:` line of its log (GET pods/NAME/log). The
condition itself is cache_status.py's (pure)."""
from __future__ import annotations

from kubeinfer.operator import model_cache
from kubeinfer.operator.apply import ApiError, KubeApi
from kubeinfer.operator.cache_status import CacheState, cache_state
from kubeinfer.operator.download_job import LABEL_CACHE_OF
from kubeinfer.operator.spec import InferenceServiceSpec

LOG_LINES = 20
PROGRESS = "progress: "


def _find(objs: list[dict], kind: str, name: str) -> dict | None:
    return next((o for o in objs if o.get("kind") == kind and o["metadata"]["name"] == name), None)


def _owned_by(pod: dict, job: dict) -> bool:
    uid = job["metadata"].get("uid")
    return any(r.get("uid") == uid for r in pod["metadata"].get("ownerReferences") or [])


def _progress(api: KubeApi, namespace: str, pods: list[dict]) -> str:
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if not running:
        return ""
    try:
        log = api.pod_log(namespace, running[0]["metadata"]["name"], LOG_LINES)
    except ApiError:
        return ""   # no pods/log permission or the pod just went: the rest of the message stands
    lines = [ln[len(PROGRESS):].strip() for ln in log.splitlines() if ln.startswith(PROGRESS)]
    return f"progress: {lines[-1]}" if lines else ""


def read_cache(api: KubeApi, spec: InferenceServiceSpec, desired: list[dict],
               observed: list[dict] | None = None) -> CacheState:
    """The cache's state. `observed`: the children just listed (Jobs and claims among them), or
    None to GET them. Raises ApiError when the API cannot be read."""
    ns = spec.namespace
    job_name = next(o["metadata"]["name"] for o in desired if o["kind"] == "Job")
    claim_name = model_cache.claim_name(spec)
    if observed is None or not spec.model.cache.creates_claim:
        claim = api.get("PersistentVolumeClaim", ns, claim_name)
    else:
        claim = _find(observed, "PersistentVolumeClaim", claim_name)
    job = api.get("Job", ns, job_name) if observed is None else _find(observed, "Job", job_name)
    pods: list[dict] = []
    progress = ""
    if job is not None:
        pods = [p for p in api.list("Pod", ns, f"{LABEL_CACHE_OF}={spec.name}") if _owned_by(p, job)]
        progress = _progress(api, ns, pods)
    return cache_state(spec, job, claim, pods, progress)
