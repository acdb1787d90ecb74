"""One reconcile of one InferenceService: parse -> render -> observe -> plan -> apply -> status.
`refresh` is the status step alone, for pod and workload events between reconciles.

API failures do not abort a reconcile: what can be applied is applied and each failed call is an
`Outcome.failed` entry, which the handler turns into a retry within seconds. A kind whose listing
failed is left alone this round (not knowing what exists, neither created nor deleted); when the
pods cannot be read the previous status is kept.

No kopf here: handlers.py calls `reconcile` and turns its Outcome into a status patch, events and
kopf errors, so the whole loop runs in tests against a fake API.
"""
from __future__ import annotations

import datetime
import secrets
import time
from dataclasses import dataclass, field

from kubeinfer.operator import model_cache, multinode
from kubeinfer.operator.apply import ApiError, Done, KubeApi, ensure_secret, execute
from kubeinfer.operator.cache_reader import read_cache
from kubeinfer.operator.cache_status import FAILED, CacheState, with_cache
from kubeinfer.operator.plan import plan
from kubeinfer.operator.render import (LABEL_HASH, LABEL_IS, common_labels, owner_reference, render,
                                       selector_labels)
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import InferenceServiceSpec, InvalidSpec, Problem, parse_spec
from kubeinfer.operator.status import compute_status, invalid_status, transition_events
from kubeinfer.operator.traffic import ROUTER_INFERENCE_POOL

CHILD_KINDS = ("Deployment", "StatefulSet", "Service", "PodDisruptionBudget",
               "Job", "PersistentVolumeClaim")   # + LWS, InferencePool
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "LeaderWorkerSet")
LWS_DISCOVERY_TTL = 60.0

Event = tuple[str, str, str]   # (type, reason, message)


@dataclass(frozen=True)
class Failure:
    """One API call that failed and is worth retrying: what it was for, and the error."""

    what: str
    error: ApiError

    def __str__(self) -> str:
        return f"{self.what}: {self.error}"


@dataclass
class Outcome:
    status: dict
    events: list[Event] = field(default_factory=list)
    invalid: InvalidSpec | None = None
    done: list[Done] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)


class LwsDiscovery:
    """Is leaderworkerset.x-k8s.io/v1 served (or InferencePool, with kind=)? Asked at most once a
    minute."""

    def __init__(self, mode: str = "auto", kind: str = "LeaderWorkerSet"):
        self.mode, self.kind, self._value, self._at = mode, kind, False, -LWS_DISCOVERY_TTL
        self.warned: set[tuple[str, str]] = set()   # InferenceServices told it is not served

    def __call__(self, api: KubeApi) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        if time.monotonic() - self._at >= LWS_DISCOVERY_TTL:
            try:
                self._value, self._at = api.serves(self.kind), time.monotonic()
            except ApiError:
                pass   # keep the last answer; asked again next time
        return self._value


def pool_discovery() -> LwsDiscovery:
    return LwsDiscovery(kind="InferencePool")


def _pool_warning(spec: InferenceServiceSpec, served: bool, pools: LwsDiscovery) -> list[Event]:
    """A Warning once per InferenceService (and operator process) that asks for an InferencePool
    the cluster does not serve; the rest of it is applied all the same."""
    key = (spec.namespace, spec.name)
    if served or spec.traffic.router != ROUTER_INFERENCE_POOL:
        pools.warned.discard(key)
        return []
    if key in pools.warned:
        return []
    pools.warned.add(key)
    return [("Warning", "InferencePoolNotServed",
             "spec.router is inference-pool but the cluster does not serve "
             "inference.networking.k8s.io/v1 InferencePool: install the Gateway API Inference "
             "Extension's CRDs (the pool is created once they are), or set spec.router to kubeinfer")]


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event_for(done: Done) -> Event:
    if done.verb == "restored":
        return ("Warning", "DriftCorrected",
                f"{done.kind} {done.name} was changed outside the operator; put it back")
    return ("Normal", done.verb.capitalize(), f"{done.verb} {done.kind} {done.name}")


def _invalid(body: dict, error: InvalidSpec, settings: OperatorSettings, now: str) -> Outcome:
    meta, previous = body["metadata"], body.get("status") or {}
    status = invalid_status(meta["name"], meta["namespace"], error, generation=meta.get("generation", 0),
                            previous=previous, now=now, settings=settings)
    return Outcome(status, transition_events(previous, status), invalid=error)


def _template_hashes(objs: list[dict]) -> frozenset[str]:
    out = set()
    for o in objs:
        spec = o.get("spec", {})
        template = spec.get("template") or spec.get("leaderWorkerTemplate", {}).get("workerTemplate")
        if template:
            if LABEL_HASH in template["metadata"]["labels"]:   # engine pods (not the download Job's)
                out.add(template["metadata"]["labels"][LABEL_HASH])
    return frozenset(out)


def _observe(api: KubeApi, spec: InferenceServiceSpec, kinds: tuple[str, ...],
             failed: list[Failure] | None = None) -> tuple[list[dict], set[str]]:
    """(the children of these kinds, the kinds that could not be listed). Without `failed` an
    ApiError is raised; with it, it is recorded there."""
    found, unknown = [], set()
    for kind in kinds:
        try:
            found += api.list(kind, spec.namespace, f"{LABEL_IS}={spec.name}")
        except ApiError as e:
            if failed is None:
                raise
            failed.append(Failure(f"list {kind}s", e))
            unknown.add(kind)
    return found, unknown


def reconcile(api: KubeApi, body: dict, settings: OperatorSettings,
              lws: LwsDiscovery | None = None, now: str | None = None,
              pools: LwsDiscovery | None = None) -> Outcome:
    """Make the children match the spec as far as the API lets it, and compute the status. API
    failures worth retrying are Outcome.failed (never raised); an invalid spec (or a child the API
    server rejects) is an Outcome.invalid."""
    now = now or now_iso()
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta.get("uid")
    try:
        spec = parse_spec(name, namespace, body.get("spec") or {}, default_image=settings.engine_image)
    except InvalidSpec as e:
        return _invalid(body, e, settings, now)

    lws_served = (lws or LwsDiscovery(settings.leaderworkerset))(api)
    use_lws = spec.pipeline > 1 and lws_served
    pools = pools or pool_discovery()
    pools_served = pools(api)
    desired = render(spec, settings, owner=body, use_lws=use_lws, pools=pools_served)
    # InferencePools are observed wherever served, so one left by spec.router is deleted
    kinds = CHILD_KINDS + (("LeaderWorkerSet",) if lws_served else ()) + \
        (("InferencePool",) if pools_served else ())
    failed: list[Failure] = []
    observed, unknown = _observe(api, spec, kinds, failed)
    cache, held = _cache(api, spec, desired, observed, failed)
    # while the model is not cached the workloads are held: none created, an existing one (serving
    # the model of before) neither changed nor deleted
    keep = unknown | (set(WORKLOAD_KINDS) if held else set())
    done: list[Done] = []
    if spec.pipeline > 1:   # before the pods that read it
        _ensure_node_secret(api, spec, body, done, failed)
    for action in plan([o for o in desired if o["kind"] not in keep],
                       [o for o in observed if o["kind"] not in keep], uid):
        try:
            done.append(execute(api, action, uid))
        except ApiError as e:
            kind, child = action.obj["kind"], action.obj["metadata"]["name"]
            if not e.invalid:
                failed.append(Failure(f"{action.verb} {kind} {child}", e))
                continue   # the other children do not depend on this one
            problem = Problem("spec", f"{kind} {child}", f"the API server rejected it: {e.message}")
            return _invalid(body, InvalidSpec([problem]), settings, now)
    if done:
        workload_kinds = tuple(k for k in kinds if k in WORKLOAD_KINDS)
        observed = [o for o in observed if o["kind"] not in workload_kinds]
        again, _ = _observe(api, spec, workload_kinds, failed)
        observed += again
    events = [_event_for(d) for d in done] + _pool_warning(spec, pools_served, pools)
    try:
        found = _status(api, body, spec, observed, desired, use_lws, settings, now, cache)
    except ApiError as e:
        failed.append(Failure("list Pods", e))
        return Outcome(dict(body.get("status") or {}), events, done=done, failed=failed)
    return Outcome(found.status, events + found.events, done=done, failed=failed)


def _ensure_node_secret(api: KubeApi, spec: InferenceServiceSpec, body: dict, done: list[Done],
                        failed: list[Failure]) -> None:
    """The pipeline groups' Secret, made once with a random value (multinode.py); owned by the
    InferenceService, so it goes with it."""
    secret = multinode.node_secret(spec, common_labels(spec.name), secrets.token_urlsafe(32))
    if body["metadata"].get("uid"):
        secret["metadata"]["ownerReferences"] = [owner_reference(body)]
    name = secret["metadata"]["name"]
    try:
        if ensure_secret(api, secret):
            done.append(Done("created", "Secret", name))
    except ApiError as e:
        failed.append(Failure(f"create Secret {name}", e))


def refresh(api: KubeApi, body: dict, settings: OperatorSettings,
            lws: LwsDiscovery | None = None, now: str | None = None) -> Outcome:
    """The status from what the pods and workloads report now, reading only: no child is created,
    changed or deleted (that is `reconcile`'s). Raises ApiError for API failures."""
    now = now or now_iso()
    meta = body["metadata"]
    try:
        spec = parse_spec(meta["name"], meta["namespace"], body.get("spec") or {},
                          default_image=settings.engine_image)
    except InvalidSpec as e:
        return _invalid(body, e, settings, now)
    lws_served = (lws or LwsDiscovery(settings.leaderworkerset))(api)
    use_lws = spec.pipeline > 1 and lws_served
    desired = render(spec, settings, owner=body, use_lws=use_lws)
    kinds = tuple(k for k in WORKLOAD_KINDS if lws_served or k != "LeaderWorkerSet")
    cache = read_cache(api, spec, desired) if model_cache.enabled(spec) else None
    return _status(api, body, spec, _observe(api, spec, kinds)[0], desired, use_lws, settings, now, cache)


def _cache(api: KubeApi, spec: InferenceServiceSpec, desired: list[dict], observed: list[dict],
           failed: list[Failure]) -> tuple[CacheState | None, bool]:
    """(the model cache's state or None without one, whether the workloads wait for it)."""
    if not model_cache.enabled(spec):
        return None, False
    try:
        cache = read_cache(api, spec, desired, observed)
    except ApiError as e:
        failed.append(Failure("read the model cache", e))
        return None, True   # not knowing, hold: never start pods on a half-downloaded model
    return cache, not cache.ready


def _status(api: KubeApi, body: dict, spec: InferenceServiceSpec, observed: list[dict], desired: list[dict],
            use_lws: bool, settings: OperatorSettings, now: str, cache: CacheState | None = None) -> Outcome:
    previous = body.get("status") or {}
    workloads = [o for o in observed if o["kind"] in WORKLOAD_KINDS]
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(spec.name).items())
    pods = api.list("Pod", spec.namespace, selector)
    status = compute_status(spec, pods, workloads, generation=body["metadata"].get("generation", 0),
                            previous=previous, now=now, settings=settings, use_lws=use_lws,
                            template_hashes=_template_hashes(desired))
    events = transition_events(previous, status)
    if cache is not None:
        status = with_cache(status, cache, held=not workloads, generation=body["metadata"].get("generation", 0),
                            previous=previous, now=now)
        events = [("Warning" if reason in (FAILED, "ClaimNotFound") else type_, reason, message)
                  for type_, reason, message in transition_events(previous, status)]
    return Outcome(status, events)
