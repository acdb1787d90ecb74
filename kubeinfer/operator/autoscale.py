"""Built-in request-based autoscaling: spec.autoscaling -> spec.replicas.

`decide` is pure: current replicas, the summed load (in-flight plus waiting requests over the ready
engine pods, plus the requests the kubeinfer router holds for the model: router_queue.py), the spec,
the scale-down window state and the time -> the replica count to set.

    target  = clamp(ceil(load / targetRequests), minReplicas, maxReplicas)
    current outside [minReplicas, maxReplicas] -> clamped at once (before anything else)
    target >= current                          -> target at once (scale up; the window is reset)
    target <  current                          -> a scale-down window opens (Below: since, peak);
                                                  after scaleDownDelaySeconds of every target staying
                                                  below current, scale down to the HIGHEST target seen
                                                  in the window (peak), so a dip in the middle of a
                                                  busy period never scales below what it needed

`Autoscaler` is the loop body the kopf timer calls (handlers.py): list the ready engine pods, scrape
each pod's /metrics on port 8000, at POD_IP:8000 or (scrape_via "apiserver") through the API
server's pod proxy, pods/NAME:8000/proxy/metrics (vllm:num_requests_running + vllm:num_requests_waiting, summed over
model_name labels), decide, and merge-patch spec.replicas of the InferenceService when it changes;
the reconcile then resizes the workload. The window state lives in memory keyed by namespace/name: an
operator restart only restarts a pending scale-down delay (never scales down early).

Scale from zero (minReplicas 0): with no pod the only load is what the router holds, so a held
request makes the target ceil(held / targetRequests) >= 1. While spec.replicas is 0 the round runs
on every timer tick (a second) rather than every intervalSeconds: it reads only the router (no pods
to scrape), and the held request's wait for a replica starts at once. Without a router URL
(--router-url) nothing can see those requests: the round posts a Warning NoRouter once.
"""
from __future__ import annotations

import logging
import math
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from kubeinfer.operator.apply import KubeApi
from kubeinfer.operator.podspec import PORT
from kubeinfer.operator.render import leader_label, selector_labels
from kubeinfer.operator.router_queue import RouterQueue
from kubeinfer.operator.spec import Autoscaling, InferenceServiceSpec, InvalidSpec, parse_spec

LOAD_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")
SCRAPE_TIMEOUT = 2.0   # seconds per pod
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Below:
    """A scale-down window: since when every target was below the current count, and the highest."""

    since: float
    peak: int


@dataclass(frozen=True)
class Decision:
    replicas: int
    below: Below | None
    reason: str


def target_replicas(load: float, spec: Autoscaling) -> int:
    want = math.ceil(max(load, 0) / spec.target_requests)
    return min(max(want, spec.min_replicas), spec.max_replicas)


def decide(current: int, load: float, spec: Autoscaling, below: Below | None, now: float) -> Decision:
    """The replica count to run now; see the module docstring for the rules."""
    target = target_replicas(load, spec)
    why = f"load {load:g} requests, target {spec.target_requests} per replica -> {target}"
    bounded = min(max(current, spec.min_replicas), spec.max_replicas)
    fix = f"; {current} is outside [{spec.min_replicas}, {spec.max_replicas}]" if bounded != current else ""
    if target >= bounded:
        return Decision(target, None, why + fix)
    # target < bounded: scale down only after the delay
    if below is None:
        below = Below(now, target)
    else:
        below = Below(below.since, max(below.peak, target))
    held = now - below.since
    if held >= spec.scale_down_delay_seconds:
        return Decision(below.peak, None,
                        f"{why}; the highest in the last {held:.0f}s was {below.peak}{fix}")
    return Decision(bounded, below,
                    f"{why}; waiting {spec.scale_down_delay_seconds - held:.0f}s more before scaling "
                    f"down{fix}")


def parse_load(text: str) -> float:
    """vllm:num_requests_running + vllm:num_requests_waiting from Prometheus text, over all labels."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in LOAD_METRICS:
                total += sample.value
    return total


def scrape_pod(ip: str, timeout: float = SCRAPE_TIMEOUT) -> float:
    """The load one engine pod reports on http://IP:8000/metrics; raises OSError/ValueError."""
    host = f"[{ip}]" if ":" in ip else ip
    with urllib.request.urlopen(f"http://{host}:{PORT}/metrics", timeout=timeout) as resp:
        return parse_load(resp.read().decode("utf-8", errors="replace"))


def proxy_path(namespace: str, pod: str) -> str:
    """The API server's proxy path of an engine pod's /metrics."""
    return f"/api/v1/namespaces/{namespace}/pods/{pod}:{PORT}/proxy/metrics"


def _ready(pod: dict) -> bool:
    return not pod.get("metadata", {}).get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or [])


@dataclass(frozen=True)
class Tick:
    """What one autoscaling round saw and did (for tests and the log)."""

    before: int        # spec.replicas as read
    load: float
    pods: int
    decision: Decision
    patched: bool
    held: int = 0      # of the load: requests the router holds
    warning: tuple[str, str, str] | None = None   # (type, reason, message) to post once

    def event(self) -> tuple[str, str, str] | None:
        """(type, reason, message) to post for a change of spec.replicas."""
        if not self.patched:
            return None
        reason = "ScaledUp" if self.decision.replicas > self.before else "ScaledDown"
        held = f", {self.held} held by the router" if self.held else ""
        return ("Normal", reason, f"spec.replicas {self.before} -> {self.decision.replicas}: "
                                  f"{self.decision.reason} ({self.pods} ready pods{held})")


class Autoscaler:
    """The per-InferenceService loop body; state in memory keyed by (namespace, name)."""

    def __init__(self, api: KubeApi, default_image: str = "", *,
                 scrape: Callable[[str], float] = scrape_pod, clock: Callable[[], float] = time.monotonic,
                 use_lws: Callable[[], bool] = lambda: False, scrape_via: str = "pod-ip",
                 router: RouterQueue | None = None):
        self.api, self.default_image, self.scrape, self.clock = api, default_image, scrape, clock
        self.use_lws, self.scrape_via, self.router = use_lws, scrape_via, router
        self._warned: set[tuple[str, str]] = set()   # NoRouter posted
        self._below: dict[tuple[str, str], Below] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._failing: set[tuple[str, str, str]] = set()   # (namespace, pod, ip) in a failure streak

    def forget(self, namespace: str, name: str) -> None:
        self._below.pop((namespace, name), None)
        self._last.pop((namespace, name), None)
        self._warned.discard((namespace, name))

    def due(self, namespace: str, name: str, interval: float) -> bool:
        """True at most once per `interval` seconds per InferenceService (the timer ticks faster)."""
        last = self._last.get((namespace, name))
        return last is None or self.clock() - last >= interval - 0.05

    def load(self, spec: InferenceServiceSpec) -> tuple[float, int]:
        """(summed load, pods scraped) over the ready pods that serve HTTP."""
        selector = {**selector_labels(spec.name),
                    **leader_label(spec, spec.pipeline > 1 and self.use_lws())}
        pods = [p for p in self.api.list("Pod", spec.namespace, ",".join(f"{k}={v}" for k, v in selector.items()))
                if _ready(p) and (p.get("status") or {}).get("podIP")]
        total = 0.0
        seen = set()
        for pod in pods:
            name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
            key = (spec.namespace, name, ip)
            seen.add(key)
            try:
                total += self._scrape(spec.namespace, name, ip)
            except Exception as e:   # unreadable metrics count as no load; never stop the loop
                if key not in self._failing:
                    self._failing.add(key)
                    log.warning(f"autoscaling {spec.namespace}/{spec.name}: cannot read the metrics of "
                                f"pod {name} ({ip}:{PORT}): {e}; counting its load as 0 until it answers")
                continue
            self._failing.discard(key)
        self._failing = {k for k in self._failing if k[0] != spec.namespace or k in seen}
        return total, len(pods)

    def _scrape(self, namespace: str, pod: str, ip: str) -> float:
        if self.scrape_via == "apiserver":
            # the API server reaches the pod for us: no NetworkPolicy hole for the operator
            return parse_load(self.api.request_text(proxy_path(namespace, pod)))
        return float(self.scrape(ip))

    def tick(self, body: dict) -> Tick | None:
        """One round for one InferenceService; None when it has no (valid) spec.autoscaling or its
        intervalSeconds has not passed since the last round. Raises ApiError when listing pods or
        patching fails (the timer logs it and goes on)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        key = (namespace, name)
        try:
            spec = parse_spec(name, namespace, body.get("spec") or {}, default_image=self.default_image)
        except InvalidSpec:
            self.forget(namespace, name)
            return None   # the reconcile reports it
        if spec.autoscaling is None or meta.get("deletionTimestamp"):
            self.forget(namespace, name)
            return None
        at_zero = spec.replicas == 0 and spec.autoscaling.scales_to_zero
        if not at_zero and not self.due(namespace, name, spec.autoscaling.interval_seconds):
            return None
        now = self.clock()
        self._last[key] = now
        load, pods = self.load(spec) if spec.replicas else (0.0, 0)
        held = self.router.held(namespace, name) if self.router is not None else 0
        decision = decide(spec.replicas, load + held, spec.autoscaling, self._below.get(key), now)
        patched = False
        if decision.replicas != spec.replicas:
            self.api.patch("InferenceService", namespace, name, {"spec": {"replicas": decision.replicas}},
                           meta.get("resourceVersion"))
            patched = True
        if decision.below is None:
            self._below.pop(key, None)
        else:
            self._below[key] = decision.below
        return Tick(spec.replicas, load + held, pods, decision, patched, held, self._no_router(spec))

    def _no_router(self, spec: InferenceServiceSpec) -> tuple[str, str, str] | None:
        key = (spec.namespace, spec.name)
        if self.router is not None or not spec.autoscaling.scales_to_zero or key in self._warned:
            return None
        self._warned.add(key)
        return ("Warning", "NoRouter", "spec.autoscaling.minReplicas is 0 but the operator has no "
                "router URL (--router-url, KUBEINFER_ROUTER_URL; the chart sets it with "
                "router.enabled): requests held by the router cannot scale this model up from zero")

