"""kopf handlers for InferenceService: thin wrappers around reconcile.reconcile and reconcile.refresh.

CONTRACT (stable; tests/e2e and the Helm chart rely on it)

Start
    kubeinfer operator [--namespace NS]... [--all-namespaces] [--liveness-port P]
                       [--resync-seconds S] [--engine-image IMAGE] [--cluster-domain D]
                       [--leaderworkerset auto|on|off] [--verbose]
    No --namespace -> all namespaces. Kube config as kopf finds it: in-cluster service account, else
    KUBECONFIG / ~/.kube/config. Runs kopf standalone: no peering CRD, no leader election (run one
    replica). Liveness: GET http://0.0.0.0:P/healthz (default 8080; 0 disables). In-process:
    `handlers.run(settings)` or `await handlers.operator(settings, stop_flag=..., ready_flag=...)`.
    Environment equivalents: see kubeinfer/operator/settings.py (KUBEINFER_RESYNC_SECONDS=1 for tests).

What it watches
    kubeinfer.io/v1alpha1 inferenceservices: create, update, resume, plus a timer every
    --resync-seconds that re-runs the same reconcile (drift correction and status refresh). kopf
    adds the finalizer kubeinfer.io/finalizer (timers need one) and keeps its progress in
    kubeinfer.io/* annotations.
    Autoscaling: a timer "autoscale" ticking every second, only on InferenceServices with
    spec.autoscaling (kopf `when` filter; it stops when the field goes), acting once per
    spec.autoscaling.intervalSeconds: GET of the ready pods (the selector below; pipeline > 1: rank
    0 only), GET http://POD_IP:8000/metrics of each (2 s timeout; unreadable = load 0, logged once
    per failure streak), the rule in autoscale.py, and when the result differs a merge PATCH of
    inferenceservices/NAME {"spec": {"replicas": N}} with metadata.resourceVersion (409 -> next
    interval) plus a Normal ScaledUp/ScaledDown event; the reconcile then resizes the workload.
    The scale-down window is kept in memory per namespace/name: a restart restarts the delay.
    Children labelled app.kubernetes.io/managed-by=kubeinfer-operator (Deployments, StatefulSets,
    Services, PodDisruptionBudgets): a DELETED event reconciles the owner at once.
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
    pipeline > 1:  LeaderWorkerSet NAME-workers when leaderworkerset.x-k8s.io/v1 is served, else
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
    (PVC mounted read-only); /abs/path -> as is; "default" (or no uri) -> omitted, the engine's
    default model (SmolLM2, shipped in the image). SERVED: spec.model.servedName or NAME.
    env: HF_HOME=/var/cache/kubeinfer/huggingface (emptyDir, or spec.model.cache.claimName),
    HF_TOKEN (secretKeyRef spec.model.credentialsSecretRef, key "token"), KUBEINFER_API_KEY
    (secretKeyRef spec.apiKeySecretRef, key "api-key"), for pipeline > 1 KUBEINFER_PP_SIZE,
    KUBEINFER_PP_RANK, KUBEINFER_LEADER_ADDRESS, KUBEINFER_DIST_PORT; then spec.engine.env.
    Probes: GET /health on port "http" (startup 10 s x 180, readiness 5 s, liveness 20 s).

Status (patched through the status subresource)
    observedGeneration, phase (Pending | Loading | Ready | Degraded | Failed), replicas, readyReplicas,
    selector, url (http://NAME.NS.svc:8000/v1), conditions Ready / Progressing / Degraded. Readiness
    is counted from pods matching the selector (condition Ready=True), see status.py.
    Events: Normal Created/Updated/Deleted/Recreated/Ready/Loading/ScaledUp/ScaledDown,
    Warning DriftCorrected, InvalidSpec, InsufficientGPU, ImagePullFailed, CrashLoop, ModelLoadFailed, ...

API calls made: see apply.py (the operator's own, including the status refresh's GET of the
InferenceService and its merge PATCH of inferenceservices/status, the autoscaler's merge PATCH of
inferenceservices spec.replicas); kopf adds discovery (/api, /apis,
/apis/G/V), list+watch of inferenceservices, of the child kinds and of pods
(labelSelector=app.kubernetes.io/managed-by=kubeinfer-operator), merge PATCH of inferenceservices (its
kubeinfer.io/* progress annotations) and of inferenceservices/status, POST of core v1 events.
"""
from __future__ import annotations

import asyncio
import logging

import kopf

from kubeinfer.operator.apply import ApiError, KubeApi
from kubeinfer.operator.autoscale import Autoscaler
from kubeinfer.operator.reconcile import LwsDiscovery, reconcile, refresh
from kubeinfer.operator.render import LABEL_IS, LABEL_MANAGED_BY, MANAGER
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import GROUP, PLURAL, VERSION

CHILDREN = (("apps", "v1", "deployments"), ("apps", "v1", "statefulsets"),
            ("", "v1", "services"), ("policy", "v1", "poddisruptionbudgets"))
# whose events refresh the owner's status: pods (readiness, crashes), workloads (rollout conditions)
STATUS_SOURCES = (("", "v1", "pods"), ("apps", "v1", "deployments"), ("apps", "v1", "statefulsets"))
STATUS_WINDOW = 0.3      # seconds: the events of one InferenceService within it make one refresh
CONFLICT_RETRIES = 3
AUTOSCALE_TICK = 1.0     # seconds: the autoscale timer's tick; each object acts every intervalSeconds


class StatusFollower:
    """Pod and workload events -> the status of the InferenceService they belong to.

    `follow` returns at once (so kopf goes on with the next event) and refreshes in a task of its own,
    coalesced per InferenceService: the first event waits STATUS_WINDOW and refreshes; events that
    come meanwhile only ask for one more round after it (the state they brought is read then), so a
    burst costs one or two refreshes and one refresh per InferenceService runs at a time. A refresh
    (reconcile.refresh, in a thread: KubeApi blocks) reads the InferenceService, its workloads and
    pods, and patches the status only when the status would change, only for a generation the
    reconcile handler has handled (that handler writes the status of a new spec), and only if the
    InferenceService is unchanged since it was read (metadata.resourceVersion; a 409 reads again).
    """

    def __init__(self, api: KubeApi, settings: OperatorSettings, lws: LwsDiscovery,
                 window: float = STATUS_WINDOW):
        self.api, self.settings, self.lws, self.window = api, settings, lws, window
        self._busy: set[tuple[str, str]] = set()    # a refresh is due or running
        self._again: set[tuple[str, str]] = set()   # ... and an event came while it ran
        self._tasks: set[asyncio.Task] = set()

    def follow(self, namespace: str, name: str, logger) -> None:
        """Ask for a refresh of InferenceService NAME's status (in the running event loop)."""
        key = (namespace, name)
        if not name:
            return
        if key in self._busy:
            self._again.add(key)
            return
        self._busy.add(key)
        task = asyncio.get_running_loop().create_task(self._refresh(key, logger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the refreshes asked for so far (tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

    async def _refresh(self, key: tuple[str, str], logger) -> None:
        try:
            while True:
                await asyncio.sleep(self.window)
                self._again.discard(key)   # the refresh below reads what those events brought
                try:
                    await asyncio.to_thread(self.refresh, *key)
                except ApiError as e:
                    logger.warning(f"could not refresh the status of InferenceService {key[0]}/{key[1]}: "
                                   f"{e}; the resync timer will try again")
                except Exception:
                    logger.exception(f"status refresh of InferenceService {key[0]}/{key[1]} failed")
                if key not in self._again:
                    return
        finally:
            self._busy.discard(key)
            self._again.discard(key)

    def refresh(self, namespace: str, name: str) -> bool:
        """One status refresh; True when it patched the status."""
        for _ in range(CONFLICT_RETRIES):
            body = self.api.get("InferenceService", namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return False
            meta, current = body["metadata"], body.get("status") or {}
            if current.get("observedGeneration") != meta.get("generation"):
                return False   # the reconcile handler has this generation to do, and writes its status
            outcome = refresh(self.api, body, self.settings, self.lws)
            if {**current, **outcome.status} == current:
                return False   # what a merge patch would leave unchanged is not sent
            try:
                self.api.patch_status("InferenceService", namespace, name, outcome.status,
                                      meta["resourceVersion"])
            except ApiError as e:
                if e.status == 409:
                    continue   # written since the GET (a reconcile, kopf's annotations): read again
                raise
            for type_, reason, message in outcome.events:
                kopf.event(body, type=type_, reason=reason, message=message)
            return True
        return False


def retry_delay(retry: int) -> float:
    """Exponential backoff for API errors that may pass: 1, 2, 4 ... 60 s."""
    return float(min(60, 2 ** min(retry, 6)))


def has_autoscaling(spec, **_) -> bool:
    """kopf `when` filter: the autoscale timer runs (and stops) with spec.autoscaling."""
    return isinstance((spec or {}).get("autoscaling"), dict)


def build_registry(settings: OperatorSettings, api: KubeApi | None = None,
                   autoscaler: Autoscaler | None = None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    api = api or KubeApi()
    lws = LwsDiscovery(settings.leaderworkerset)
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs):
        # a plain OperatorRegistry has no default login: in-cluster token, else KUBECONFIG
        return kopf.login_via_client(**kwargs)

    def run_reconcile(body, patch, logger, retry: int, *, user_change: bool) -> None:
        if body.get("metadata", {}).get("deletionTimestamp"):
            return  # owner references take the children with it
        try:
            outcome = reconcile(api, dict(body), settings, lws)
        except ApiError as e:
            raise kopf.TemporaryError(f"Kubernetes API: {e}", delay=retry_delay(retry)) from None
        events = list(outcome.events)
        if outcome.invalid and user_change and not any(r == "InvalidSpec" for _, r, _ in events):
            events.append(("Warning", "InvalidSpec", str(outcome.invalid)))
        for type_, reason, message in events:
            kopf.event(body, type=type_, reason=reason, message=message)
        if outcome.status != dict(body.get("status") or {}):
            patch.status.update(outcome.status)
        if outcome.invalid and user_change:
            # the status says what to fix; retrying the same spec cannot help
            raise kopf.PermanentError(f"invalid spec: {outcome.invalid}")

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", registry=registry)
    def on_change(body, patch, logger, retry, **_):
        run_reconcile(body, patch, logger, retry, user_change=True)

    @kopf.timer(*resource, id="resync", interval=settings.resync_seconds,
                initial_delay=settings.resync_seconds, registry=registry)
    def resync(body, patch, logger, retry, **_):
        run_reconcile(body, patch, logger, retry, user_change=False)

    autoscaler = autoscaler or Autoscaler(api, settings.engine_image, use_lws=lambda: lws(api))

    @kopf.timer(*resource, id="autoscale", interval=AUTOSCALE_TICK, when=has_autoscaling, registry=registry)
    def autoscale(body, logger, **_):
        meta = body.get("metadata", {})
        try:
            tick = autoscaler.tick(dict(body))
        except ApiError as e:
            # 409: spec changed since kopf's read (a user, a reconcile): the next tick reads again
            logger.warning(f"autoscaling {meta.get('namespace')}/{meta.get('name')}: {e}; trying again "
                           "next interval")
            return
        except Exception:
            logger.exception(f"autoscaling {meta.get('namespace')}/{meta.get('name')} failed")
            return
        event = tick.event() if tick else None
        if event is not None:
            type_, reason, message = event
            logger.info(message)
            kopf.event(body, type=type_, reason=reason, message=message)

    def on_child_event(type, body, logger, **_):
        if type != "DELETED":
            return  # edits are found by the resync timer; deletions are put back at once
        meta = body.get("metadata", {})
        namespace, owner_name = meta.get("namespace", ""), (meta.get("labels") or {}).get(LABEL_IS, "")
        try:
            owner = api.get("InferenceService", namespace, owner_name)
            if owner is not None and not owner.get("metadata", {}).get("deletionTimestamp"):
                reconcile(api, owner, settings, lws)
        except ApiError as e:
            logger.warning(f"could not restore {body.get('kind')} {meta.get('name')}: {e}; "
                           "the resync timer will try again")

    for group, version, plural in CHILDREN:
        kopf.on.event(group, version, plural, id=f"child-{plural}", labels={LABEL_MANAGED_BY: MANAGER},
                      registry=registry)(on_child_event)

    follower = StatusFollower(api, settings, lws)

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
    s.peering.standalone = True            # one replica; no KopfPeering CRD needed
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
    # only our engine pods, filtered by the API server: not every pod of the cluster
    s.watching.label_selectors["", "v1", "pods"] = f"{LABEL_MANAGED_BY}={MANAGER}"
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


async def operator(settings: OperatorSettings, **kwargs) -> None:
    """Run in the current event loop (stop_flag=, ready_flag= as kopf.operator takes them)."""
    await kopf.operator(registry=build_registry(settings), settings=kopf_settings(settings),
                        **_run_kwargs(settings), **kwargs)


def run(settings: OperatorSettings) -> None:
    """Block until SIGINT/SIGTERM."""
    kopf.run(registry=build_registry(settings), settings=kopf_settings(settings),
             **_run_kwargs(settings))
