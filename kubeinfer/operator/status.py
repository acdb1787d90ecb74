"""Pure: the InferenceService status from what its pods and workloads report.

Phase                                      Ready condition reason (problems first)
  Ready     every replica ready, no problem   Ready
  Degraded  some replicas ready, a problem    the problem's reason
  Loading   pods running, not all ready       Loading (or a problem)
  Pending   no pod running yet / scaled to 0  InsufficientGPU, Unschedulable, Pending, ScaledToZero
  Failed    invalid spec, or every pod fails  InvalidSpec, CrashLoop, ModelLoadFailed, ImagePullFailed,
                                              ContainerConfigError

Readiness is counted from pods (label selector), so it does not matter which workload kind runs them;
with pipeline > 1 a replica is a group of pods and is ready when all of them are.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kubeinfer.operator.podspec import PORT
from kubeinfer.operator.render import LABEL_GROUP, LABEL_HASH, LWS_GROUP_INDEX, selector_string
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import InferenceServiceSpec, InvalidSpec

PRIORITY = ("InvalidSpec", "ModelLoadFailed", "ImagePullFailed", "ContainerConfigError", "CrashLoop",
            "InsufficientGPU", "Unschedulable", "ProgressDeadlineExceeded")
FAILING = {"ModelLoadFailed", "ImagePullFailed", "ContainerConfigError", "CrashLoop"}
IMAGE_PULL = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
# the first line of the termination message `kubeinfer serve` writes when it cannot start
# (kubeinfer/engine/server/termination_log.py; repeated here: the operator does not import the engine)
STARTUP_MARKER = "kubeinfer serve: start-up failed"
# what `kubeinfer serve` (and transformers / the hub client) print when weights do not load, for
# images older than the termination message
MODEL_LOAD_RE = re.compile(r"could not load model|model loading failed|failed to load|model path |"
                           r"repository not found|gated repo|is not a local folder|"
                           r"does not appear to have a file|no such file or directory", re.IGNORECASE)


@dataclass(frozen=True)
class PodProblem:
    reason: str
    pod: str
    message: str


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error")]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def _first_lines(text: str, limit: int = 600) -> str:
    said = " ".join(ln.strip() for ln in text.strip().splitlines() if ln.strip()).rstrip(".")
    return said if len(said) <= limit else said[:limit - 3] + "..."


def pod_problem(pod: dict, spec: InferenceServiceSpec) -> PodProblem | None:
    """What keeps this pod from serving, in words a user can act on; None if nothing (yet)."""
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                and cond.get("reason") == "Unschedulable":
            msg = cond.get("message", "")
            if spec.uses_gpu and f"insufficient {spec.accelerator}" in msg.lower():
                return PodProblem("InsufficientGPU", name, (
                    f"pod {name} needs {spec.tensor} {spec.accelerator} on one node and none has them "
                    f"free ({msg}). The cluster autoscaler adds a GPU node when a node group offers "
                    "one; otherwise free GPUs or lower spec.parallelism.tensor or spec.replicas"))
            return PodProblem("Unschedulable", name, (
                f"pod {name} cannot be scheduled: {msg}. Check spec.scheduling (nodeSelector, "
                "tolerations, affinity) and spec.resources"))
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state = cs.get("state") or {}
        waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        reason = waiting.get("reason", "")
        if reason in IMAGE_PULL:
            return PodProblem("ImagePullFailed", name, (
                f"pod {name} cannot pull image {cs.get('image', '')}: {waiting.get('message', reason)}. "
                "Check spec.engine.image and spec.engine.imagePullSecrets"))
        if reason == "CreateContainerConfigError":
            return PodProblem("ContainerConfigError", name, (
                f"pod {name} cannot start: {waiting.get('message', reason)}. Create the Secret or fix "
                "spec.model.credentialsSecretRef / spec.apiKeySecretRef"))
        exited = terminated if terminated.get("exitCode") not in (None, 0) else {}
        # restarted and not ready again: between two crashes a crash loop looks like loading
        relapsed = bool(last.get("exitCode")) and cs.get("restartCount", 0) > 0 and not cs.get("ready")
        if reason == "CrashLoopBackOff" or exited or relapsed:
            term = exited or last
            text = term.get("message", "")
            if text.startswith(STARTUP_MARKER):
                said = _first_lines(text[len(STARTUP_MARKER):])
                return PodProblem("ModelLoadFailed", name, (
                    f"pod {name}: the engine could not start: {said}. Check spec.model.uri, "
                    "spec.model.revision, spec.model.credentialsSecretRef and spec.engine.args"))
            said = _last_line(text).rstrip(".")
            if MODEL_LOAD_RE.search(text):
                return PodProblem("ModelLoadFailed", name, (
                    f"pod {name}: the engine could not load the model: {said}. Check spec.model.uri, "
                    "spec.model.revision and spec.model.credentialsSecretRef"))
            why = ("it was killed for exceeding its memory limit (OOMKilled): raise the memory in "
                   "spec.resources" if term.get("reason") == "OOMKilled" else
                   f"exit code {term.get('exitCode', '?')}: {said or 'no message'}")
            return PodProblem("CrashLoop", name, (
                f"pod {name} keeps exiting ({cs.get('restartCount', 0)} restarts), {why}. "
                f"See `kubectl logs {name} --previous`"))
    return None


def _is_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _group_of(pod: dict, spec: InferenceServiceSpec) -> str:
    labels = pod.get("metadata", {}).get("labels") or {}
    if spec.pipeline == 1:
        return pod.get("metadata", {}).get("name", "")
    return labels.get(LABEL_GROUP) or labels.get(LWS_GROUP_INDEX) or "0"


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int,
               previous: list[dict], now: str) -> dict:
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == type_), {})
    since = before.get("lastTransitionTime") if before.get("status") == status else None
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since or now, "observedGeneration": generation}


def _base(spec_name: str, namespace: str, settings: OperatorSettings, generation: int) -> dict:
    return {"observedGeneration": generation,
            "url": f"http://{settings.service_host(spec_name, namespace)}:{PORT}/v1"}


def invalid_status(name: str, namespace: str, error: InvalidSpec, *, generation: int,
                   previous: dict | None, now: str, settings: OperatorSettings) -> dict:
    prev = (previous or {}).get("conditions") or []
    message = "invalid spec: " + "; ".join(str(p) for p in error.problems)
    return {**(previous or {}), **_base(name, namespace, settings, generation), "phase": "Failed",
            "conditions": [_condition("Ready", False, "InvalidSpec", message, generation, prev, now),
                           _condition("Progressing", False, "InvalidSpec", message, generation, prev, now),
                           _condition("Degraded", True, "InvalidSpec", message, generation, prev, now)]}


def compute_status(spec: InferenceServiceSpec, pods: list[dict], workloads: list[dict], *,
                   generation: int, previous: dict | None, now: str, settings: OperatorSettings,
                   use_lws: bool = False, template_hashes: frozenset[str] = frozenset()) -> dict:
    """The status subresource; `previous` keeps lastTransitionTime of unchanged conditions."""
    prev = (previous or {}).get("conditions") or []
    live = [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")]
    groups: dict[str, list[dict]] = {}
    for pod in live:
        groups.setdefault(_group_of(pod, spec), []).append(pod)
    ready = sum(1 for g in groups.values() if len(g) >= spec.pipeline and all(map(_is_ready, g)))
    problems = sorted(filter(None, (pod_problem(p, spec) for p in live)),
                      key=lambda p: (PRIORITY.index(p.reason), p.pod))
    for w in workloads:
        for c in (w.get("status") or {}).get("conditions") or []:
            if c.get("reason") == "ProgressDeadlineExceeded" and c.get("status") == "False":
                problems.append(PodProblem("ProgressDeadlineExceeded", w["metadata"]["name"],
                                           c.get("message", "the rollout made no progress")))
    failing = [p for p in problems if p.reason in FAILING]
    running = any((p.get("status") or {}).get("phase") == "Running" for p in live)
    rolling = bool(template_hashes) and any(
        (p.get("metadata", {}).get("labels") or {}).get(LABEL_HASH) not in template_hashes for p in live)
    want, counts = spec.replicas, f"{ready}/{spec.replicas} replicas ready"
    top = problems[0] if problems else None

    if want == 0 and spec.autoscaling is not None and spec.autoscaling.scales_to_zero:
        phase, reason, message = "Pending", "ScaledToZero", (
            "no requests for spec.autoscaling.scaleDownDelaySeconds: scaled to zero; the next request "
            "through the kubeinfer router scales it up (the router holds it meanwhile)")
    elif want == 0:
        phase, reason, message = "Pending", "ScaledToZero", "spec.replicas is 0; scale up to serve"
    elif problems and ready > 0:
        phase, reason, message = "Degraded", top.reason, f"{counts}; {top.message}"
    elif ready >= want:
        phase, reason, message = "Ready", "Ready", f"{counts}"
    elif live and len({p.pod for p in failing}) >= len(live):
        phase, reason, message = "Failed", top.reason, f"{counts}; {top.message}"
    elif top is not None:
        phase, reason, message = ("Loading" if running else "Pending"), top.reason, f"{counts}; {top.message}"
    elif running:
        phase, reason, message = "Loading", "Loading", f"{counts}; the engine is loading the model"
    else:
        phase, reason, message = "Pending", "Pending", f"{counts}; waiting for pods to be scheduled"

    is_ready = want > 0 and ready >= want
    progressing = not failing and want > 0 and (ready < want or rolling)
    status = {
        **_base(spec.name, spec.namespace, settings, generation), "phase": phase,
        "replicas": len(groups), "readyReplicas": ready,
        "selector": selector_string(spec, use_lws),
        "conditions": [
            _condition("Ready", is_ready, "Ready" if is_ready else reason,
                       message if not is_ready or problems else f"{counts}; serving at the url",
                       generation, prev, now),
            _condition("Progressing", progressing,
                       ("RollingOut" if rolling else "Loading") if progressing else
                       (top.reason if failing else "Complete"),
                       message if progressing or failing else counts, generation, prev, now),
            _condition("Degraded", bool(problems), top.reason if top else "AsExpected",
                       top.message if top else "no problems seen", generation, prev, now),
        ],
    }
    return status


def transition_events(previous: dict | None, current: dict) -> list[tuple[str, str, str]]:
    """(type, reason, message) to post when the Ready condition changed reason or status."""
    def ready(status: dict | None) -> dict:
        return next((c for c in (status or {}).get("conditions") or [] if c.get("type") == "Ready"), {})

    before, after = ready(previous), ready(current)
    if (before.get("status"), before.get("reason")) == (after.get("status"), after.get("reason")):
        return []
    if after.get("status") == "True":
        return [("Normal", "Ready", f"{after.get('message')}: {current.get('url')}")]
    kind = "Warning" if after.get("reason") in PRIORITY else "Normal"
    return [(kind, after.get("reason", "Unknown"), after.get("message", ""))]
