"""kopf handlers for InferenceService: thin wrappers around reconcile.reconcile and reconcile.refresh.

CONTRACT (stable; tests/e2e and the Helm chart rely on it)

Start
    kubeinfer operator [--namespace NS]... [--all-namespaces] [--liveness-port P]
                       [--resync-seconds S] [--engine-image IMAGE] [--cluster-domain D]
                       [--leaderworkerset auto|on|off] [--router-url URL] [--verbose]
    No --namespace -> all namespaces. Kube config as kopf finds it: in-cluster service account, else
    KUBECONFIG / ~/.kube/config. kopf runs standalone (no peering CRD); with
    --leader-election-namespace NS the replicas elect a leader through Lease NS/kubeinfer-operator
    (leader.py) and only the leader runs kopf, so several replicas are safe; without it run one.
    Liveness: GET http://0.0.0.0:P/healthz (default 8080; 0 disables), answered by a standby too.
    Metrics: GET http://0.0.0.0:M/metrics (default 8081; 0 disables; see metrics.py). Log lines
    about an object start with [namespace/name]. In-process: `handlers.run(settings)` or
    `await handlers.operator(settings, stop_flag=..., ready_flag=...)`.
    Environment equivalents: see kubeinfer/operator/settings.py (KUBEINFER_RESYNC_SECONDS=1 for tests).

What it watches
    kubeinfer.io/v1alpha1 inferenceservices: create, update, resume, plus a timer every
    --resync-seconds that re-runs the same reconcile (drift correction and status refresh). kopf
    adds the finalizer kubeinfer.io/finalizer (timers need one) and keeps its progress in
    kubeinfer.io/* annotations. API errors never abort a reconcile: what can be applied is, and
    the handler then raises kopf.TemporaryError with a delay of 1, 2, 4, then 5 s (retry_delay), so
    a spec changed during an API outage is applied within seconds of its end. One reconcile,
    restore or status refresh of an InferenceService runs at a time (locks.py).
    Autoscaling: a timer "autoscale" ticking every second, only on InferenceServices with
    spec.autoscaling (kopf `when` filter; it stops when the field goes), acting once per
    spec.autoscaling.intervalSeconds: GET of the ready pods (the selector below; pipeline > 1: rank
    0 only), GET http://POD_IP:8000/metrics of each, or with --scrape-via apiserver GET
    pods/NAME:8000/proxy/metrics (2 s timeout; unreadable = load 0, logged once per failure streak), the rule in autoscale.py, and when the result differs a merge PATCH of
    inferenceservices/NAME {"spec": {"replicas": N}} with metadata.resourceVersion (409 -> next
    interval) plus a Normal ScaledUp/ScaledDown event; the reconcile then resizes the workload.
    The scale-down window is kept in memory per namespace/name: a restart restarts the delay.
    With --router-url the load adds the requests the kubeinfer router holds for the model (GET
    ROUTER/queue, read at most twice a second, router_queue.py); while spec.replicas is 0 with
    minReplicas 0 the round runs every tick, so a held request scales it up from zero within a
    second or so (without --router-url: a Warning NoRouter event, once).
    Children labelled app.kubernetes.io/managed-by=kubeinfer-operator (Deployments, StatefulSets,
    Services, PodDisruptionBudgets, Jobs, PersistentVolumeClaims, and LeaderWorkerSets unless --leaderworkerset off; the label is
    a server-side selector on each watch): a DELETED event reconciles the owner at once and posts
    its events and status (with metadata.resourceVersion) like any reconcile.
    Pods labelled app.kubernetes.io/managed-by=kubeinfer-operator (a server-side label selector on
    the watch), and the Deployments and StatefulSets above: any event after the initial listing
    refreshes the status of the InferenceService named by the kubeinfer.io/inferenceservice label
    in the same namespace, so the status follows the pods within about a second (StatusFollower:
    events coalesced per InferenceService, reads only, PATCH only when the status changed and only
    for a generation the reconcile has handled, with metadata.resourceVersion so a stale status never
    overwrites a newer one). No child is written on this path, and a status patch fires none of
    these events, so nothing loops.

Children of InferenceService NAME in namespace NS (owner reference: controller, blockOwnerDeletion)
    pipeline == 1: Deployment NAME, Service NAME (ClusterIP, port 8000 "http"), PodDisruptionBudget NAME
    spec.model.cache pvc | storageClass+size: PersistentVolumeClaim NAME-model-cache (ReadWriteMany;
                   only for storageClass+size; no owner reference with reclaimPolicy Retain) and Job
                   NAME-download-HASH (`kubeinfer download`); the workload is created only once the
                   Job is Complete, and every event of the Job reconciles at once
    spec.router inference-pool: InferencePool NAME (inference.networking.k8s.io/v1, when served;
                   else a Warning InferencePoolNotServed once), selector as the Service's,
                   targetPorts [8000], endpointPickerRef spec.inferencePool.endpointPickerRef
                   (default NAME-epp:9002)
    pipeline > 1 (refused by spec.py until the operator renders the engine's multi-node flags):
                   LeaderWorkerSet NAME-workers when leaderworkerset.x-k8s.io/v1 is served, else
                   StatefulSet NAME-G per replica G plus headless Service NAME-workers; Service NAME
                   and PodDisruptionBudget NAME as above.
    Labels on every child and pod: app.kubernetes.io/name=kubeinfer, app.kubernetes.io/instance=NAME,
    app.kubernetes.io/component=engine, app.kubernetes.io/managed-by=kubeinfer-operator,
    kubeinfer.io/inferenceservice=NAME; pod templates add kubeinfer.io/template-hash=HASH.
    Selector (Deployment, Service, PDB, status.selector):
        app.kubernetes.io/name=kubeinfer,kubeinfer.io/inferenceservice=NAME
    Annotation on every child: kubeinfer.io/spec-hash.

The engine container ("engine")
    command ["kubeinfer"], args ["serve", MODEL?, "--host", "0.0.0.0", "--port", "8000",
    "--served-model-name", SERVED, "--tensor-parallel-size", T, "--pipeline-parallel-size", P,
    "--timeout-graceful-shutdown", S, ("--revision", REV for hf://), "--device", cuda|cpu,
    *spec.engine.args]. MODEL: hf://ORG/NAME -> ORG/NAME; pvc://CLAIM/PATH -> /models/CLAIM/PATH
    (PVC mounted read-only); with spec.model.cache pvc|storageClass the hf:// model is
    /model-store/models/ORG--NAME/REVISION on the cache claim (mounted read-only, HF_HUB_OFFLINE=1,
    no --revision, no HF_TOKEN); /abs/path -> as is; "default" -> omitted, the engine's default
    model (SmolLM2, shipped in the image); spec.model.uri is required. SERVED: spec.model.servedName or NAME.
    env: HF_HOME=/var/cache/kubeinfer/huggingface (emptyDir, or spec.model.cache.claimName),
    HF_TOKEN (secretKeyRef spec.model.credentialsSecretRef, key "token"), KUBEINFER_API_KEY
    (secretKeyRef spec.apiKeySecretRef, key "api-key"), KUBEINFER_TERMINATION_LOG=/dev/termination-log
    (the engine writes its fatal start-up error there), for pipeline > 1 KUBEINFER_NODE_SECRET
    (secretKeyRef NAME-node-secret, made once by the operator) and the multi-node flags
    (multinode.py); then spec.engine.env.
    Probes: GET /health on port "http" (startup 10 s x 180, readiness 5 s, liveness 20 s).

Status (patched through the status subresource)
    observedGeneration, phase (Pending | Downloading | Loading | Ready | Degraded | Failed), replicas,
    readyReplicas, selector, url (http://NAME.NS.svc:8000/v1), conditions Ready / Progressing /
    Degraded, and ModelCached with spec.model.cache (cache_status.py). Readiness
    is counted from pods matching the selector (condition Ready=True), see status.py.
    Events: Normal Created/Updated/Deleted/Recreated/Ready/Loading/ScaledUp/ScaledDown,
    Warning DriftCorrected, InvalidSpec, InsufficientGPU, ImagePullFailed, CrashLoop, ModelLoadFailed, ...

API calls made: see apply.py (the operator's own, including the status refresh's GET of the
InferenceService and its merge PATCH of inferenceservices/status, the autoscaler's merge PATCH of
inferenceservices spec.replicas, leader election's Lease); kopf adds discovery (/api, /apis,
/apis/G/V), list+watch of inferenceservices, of the child kinds and of pods
(labelSelector=app.kubernetes.io/managed-by=kubeinfer-operator), merge PATCH of inferenceservices (its
kubeinfer.io/* progress annotations) and of inferenceservices/status, POST of core v1 events.
"""
from __future__ import annotations

import asyncio
import logging

import kopf

from kubeinfer.operator import metrics
from kubeinfer.operator.apply import ApiError, KubeApi
from kubeinfer.operator.autoscale import Autoscaler
from kubeinfer.operator.leader import LeaderElector
from kubeinfer.operator.locks import ObjectLocks
from kubeinfer.operator.reconcile import LwsDiscovery, Outcome, pool_discovery, reconcile
from kubeinfer.operator.render import LABEL_IS, LABEL_MANAGED_BY, MANAGER
from kubeinfer.operator.router_queue import RouterQueue
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import GROUP, PLURAL, VERSION
from kubeinfer.operator.status_follower import StatusFollower, publish

CHILDREN = (("apps", "v1", "deployments"), ("apps", "v1", "statefulsets"),
            ("", "v1", "services"), ("policy", "v1", "poddisruptionbudgets"),
            ("batch", "v1", "jobs"), ("", "v1", "persistentvolumeclaims"))
JOBS = ("batch", "v1", "jobs")   # any change of a download Job reconciles: its end releases the pods
LWS = ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")
# whose events refresh the owner's status: pods (readiness, crashes), workloads (rollout conditions)
STATUS_SOURCES = (("", "v1", "pods"), ("apps", "v1", "deployments"), ("apps", "v1", "statefulsets"))
AUTOSCALE_TICK = 1.0     # seconds: the autoscale timer's tick; each object acts every intervalSeconds
MANAGED = f"{LABEL_MANAGED_BY}={MANAGER}"
log = logging.getLogger(__name__)


def retry_delay(retry: int) -> float:
    """Seconds before retrying a reconcile that met API errors: 1, 2, 4, then 5. Short on purpose:
    an outage must not leave a spec change waiting a minute once the API answers again."""
    return float(min(5, 2 ** min(retry, 3)))


def has_autoscaling(spec, **_) -> bool:
    """kopf `when` filter: the autoscale timer runs (and stops) with spec.autoscaling."""
    return isinstance((spec or {}).get("autoscaling"), dict)


def child_resources(settings: OperatorSettings) -> tuple[tuple[str, str, str], ...]:
    """The child kinds whose deletion is put back at once (LeaderWorkerSets unless turned off)."""
    return CHILDREN + ((LWS,) if settings.leaderworkerset != "off" else ())


def _failed_message(name: str, outcome: Outcome) -> str:
    shown = "; ".join(str(f) for f in outcome.failed[:3])
    more = f" (and {len(outcome.failed) - 3} more)" if len(outcome.failed) > 3 else ""
    return f"InferenceService {name}: {len(outcome.failed)} Kubernetes API call(s) failed: {shown}{more}"


def build_registry(settings: OperatorSettings, api: KubeApi | None = None,
                   autoscaler: Autoscaler | None = None, locks: ObjectLocks | None = None,
                   phases: metrics.PhaseTracker | None = None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    api = api or KubeApi()
    lws = LwsDiscovery(settings.leaderworkerset)
    pools = pool_discovery()
    locks = ObjectLocks() if locks is None else locks
    phases = phases or metrics.PhaseTracker()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs):
        # a plain OperatorRegistry has no default login: in-cluster token, else KUBECONFIG
        return kopf.login_via_client(**kwargs)

    def run_reconcile(body, patch, logger, retry: int, *, trigger: str) -> None:
        meta = body.get("metadata", {})
        if meta.get("deletionTimestamp"):
            return  # owner references take the children with it
        user_change = trigger == "change"
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        with locks.hold(namespace, name), metrics.reconciling(trigger) as timed:
            outcome = reconcile(api, dict(body), settings, lws, pools=pools)
            events = list(outcome.events)
            if outcome.invalid and user_change and not any(r == "InvalidSpec" for _, r, _ in events):
                events.append(("Warning", "InvalidSpec", str(outcome.invalid)))
            for type_, reason, message in events:
                kopf.event(body, type=type_, reason=reason, message=message)
            if outcome.status != dict(body.get("status") or {}):
                patch.status.update(outcome.status)
            if outcome.status.get("phase"):   # no phase: the pods could not be read
                phases.set(namespace, name, outcome.status["phase"])
            if outcome.invalid:
                timed.result = "invalid"
            elif outcome.failed:
                timed.result = "partial"
        if outcome.failed:
            # applied what could be applied; the rest soon, not after a minute of backoff
            raise kopf.TemporaryError(_failed_message(f"{namespace}/{name}", outcome) +
                                      f"; retrying in {retry_delay(retry):g} s", delay=retry_delay(retry))
        if outcome.invalid and user_change:
            # the status says what to fix; retrying the same spec cannot help
            raise kopf.PermanentError(f"invalid spec: {outcome.invalid}")

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", registry=registry)
    def on_change(body, patch, logger, retry, **_):
        run_reconcile(body, patch, logger, retry, trigger="change")

    @kopf.timer(*resource, id="resync", interval=settings.resync_seconds,
                initial_delay=settings.resync_seconds, registry=registry)
    def resync(body, patch, logger, retry, **_):
        run_reconcile(body, patch, logger, retry, trigger="resync")

    router = RouterQueue(settings.router_url) if settings.router_url else None
    autoscaler = autoscaler or Autoscaler(api, settings.engine_image, use_lws=lambda: lws(api),
                                          scrape_via=settings.scrape_via, router=router)

    @kopf.on.delete(*resource, id="forget", optional=True, registry=registry)
    def forget(name, namespace, **_):
        # optional: no finalizer of its own; it only drops what this process keeps about the object
        phases.set(namespace, name, None)
        autoscaler.forget(namespace, name)
        locks.forget(namespace, name)

    @kopf.timer(*resource, id="autoscale", interval=AUTOSCALE_TICK, when=has_autoscaling, registry=registry)
    def autoscale(body, logger, **_):
        try:
            tick = autoscaler.tick(dict(body))
        except ApiError as e:
            # 409: spec changed since kopf's read (a user, a reconcile): the next tick reads again
            logger.warning(f"autoscaling: {e}; trying again next interval")
            return
        except Exception:
            logger.exception("autoscaling failed")
            return
        for event in (tick.warning, tick.event()) if tick else ():
            if event is not None:
                type_, reason, message = event
                logger.info(message)
                kopf.event(body, type=type_, reason=reason, message=message)

    def on_child_event(type, body, logger, resource=None, **_):
        if type != "DELETED" and not (type and resource is not None and
                                      (resource.group, resource.version, resource.plural) == JOBS):
            return  # edits are found by the resync timer; deletions are put back at once
        meta = body.get("metadata", {})
        namespace, owner_name = meta.get("namespace", ""), (meta.get("labels") or {}).get(LABEL_IS, "")
        if not owner_name:
            return
        # a download Job that moved on reconciles too: its success releases the engine pods
        child = f"{'deleted' if type == 'DELETED' else 'changed'} {body.get('kind', 'child')} {meta.get('name')}"
        doing = "restoring the" if type == "DELETED" else "reconciling after the"
        where = f"InferenceService {namespace}/{owner_name}"
        try:
            with locks.hold(namespace, owner_name), metrics.reconciling("restore") as timed:
                owner = api.get("InferenceService", namespace, owner_name)
                if owner is None or owner.get("metadata", {}).get("deletionTimestamp"):
                    return
                outcome = reconcile(api, owner, settings, lws, pools=pools)
                if outcome.failed:
                    timed.result = "partial"
                try:
                    publish(api, owner, outcome, phases)
                except ApiError as e:
                    if e.status != 409:
                        raise
                    # changed since the read: kopf's handlers have a newer version to write
                    for type_, reason, message in outcome.events:
                        kopf.event(owner, type=type_, reason=reason, message=message)
        except ApiError as e:
            log.warning(f"{where}: could not act on the {child}: {e}; the resync timer will try again")
            return
        if outcome.failed:
            log.warning(f"{where}: {doing} {child}: {_failed_message(where, outcome)}; "
                        "the resync timer will try again")

    for group, version, plural in child_resources(settings):
        kopf.on.event(group, version, plural, id=f"child-{plural}", labels={LABEL_MANAGED_BY: MANAGER},
                      registry=registry)(on_child_event)

    follower = StatusFollower(api, settings, lws, locks=locks, phases=phases)

    async def on_status_event(type, body, logger, **_):
        if type is None:
            return  # the initial listing: the resume handler reconciles every InferenceService anyway
        meta = body.get("metadata", {})
        follower.follow(meta.get("namespace", ""), (meta.get("labels") or {}).get(LABEL_IS, ""), logger)

    for group, version, plural in STATUS_SOURCES:
        kopf.on.event(group, version, plural, id=f"status-{plural}", labels={LABEL_MANAGED_BY: MANAGER},
                      registry=registry)(on_status_event)
    return registry


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    s.peering.standalone = True            # leader election, when on, is leader.py's Lease
    s.scanning.disabled = True             # no cluster-wide CRD/namespace watch: least privilege
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    # kopf puts a finalizer on objects with timers, to stop the timer before they go; name it ours.
    # Deleting an InferenceService therefore waits for a running operator (charts/kubeinfer/README.md).
    s.persistence.finalizer = f"{GROUP}/finalizer"
    s.posting.level = logging.WARNING      # our own events only, not kopf's "handler succeeded"
    s.posting.reporting_component = MANAGER
    s.watching.server_timeout = 300        # re-list now and then instead of trusting one long watch
    s.watching.client_timeout = 330
    # kopf's own calls (progress annotations, status, events) retry sooner than its default
    # 1..21 s ladder: under a flaky API server the operator keeps moving
    s.networking.error_backoffs = (0.5, 1, 1, 2, 3, 5)
    # after an unexpected error kopf throttles the object (its default ladder grows to 610 s and
    # keeps the last delay): in a total API outage the operator went silent for ~45 s after a
    # failed progress patch; at most 10 s keeps it retrying, and a change lands soon after
    s.batching.error_delays = (1, 1, 2, 3, 5, 8, 10)
    # only our engine pods and our children, filtered by the API server: not every object of the
    # cluster
    for resource in (*STATUS_SOURCES, *CHILDREN, LWS):
        s.watching.label_selectors[resource] = MANAGED
    s.execution.max_workers = 16
    return s


def _run_kwargs(settings: OperatorSettings) -> dict:
    kwargs: dict = {"standalone": True}
    if settings.all_namespaces:
        kwargs["clusterwide"] = True
    else:
        kwargs["namespaces"] = list(settings.namespaces)
    if settings.liveness_port:
        kwargs["liveness_endpoint"] = f"http://0.0.0.0:{settings.liveness_port}/healthz"
    return kwargs


async def _standby_health(port: int):
    """/healthz of a replica waiting for the lease (kopf serves it once it runs); None when off."""
    if not port:
        return None
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/healthz", lambda _: web.json_response({"standby": True}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def operator(settings: OperatorSettings, *, api: KubeApi | None = None,
                   stop_flag: asyncio.Event | None = None, **kwargs) -> int:
    """Run in the current event loop (ready_flag= as kopf.operator takes it) until `stop_flag` or a
    signal; 1 when the leader lease was lost, else 0."""
    api = api or KubeApi()
    metrics.serve(settings.metrics_port)
    stop = stop_flag or asyncio.Event()
    elector = keeper = None
    if settings.leader_election_namespace:
        elector = LeaderElector(api, settings.leader_election_namespace)
        health = await _standby_health(settings.liveness_port)
        try:
            await elector.acquire()
        finally:
            if health is not None:
                await health.cleanup()   # kopf binds the port next
        keeper = asyncio.get_running_loop().create_task(elector.keep(stop))
    registry = build_registry(settings, api=api)

    @kopf.on.cleanup(id="stop-flag", registry=registry)
    async def raise_stop_flag(**_) -> None:
        # kopf stopped by a signal leaves its waiter on `stop` running and gives that "hung" task
        # 5 s before it cancels it: every SIGTERM (a rollout, a scale-down) took 5 s longer
        stop.set()

    try:
        await kopf.operator(registry=registry, settings=kopf_settings(settings),
                            stop_flag=stop, **_run_kwargs(settings), **kwargs)
    finally:
        if keeper is not None:
            stop.set()
            await keeper
        if elector is not None and not elector.lost:
            await asyncio.to_thread(elector.release)
    return 1 if elector is not None and elector.lost else 0


def run(settings: OperatorSettings) -> int:
    """Block until SIGINT/SIGTERM (kopf handles them); the process's exit status."""
    return asyncio.run(operator(settings))
