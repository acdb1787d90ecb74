"""The only module that talks to the Kubernetes API.

Calls, all JSON over the official client's connection (kubeconfig or in-cluster, as kopf logs in):

    GET    LIST_PATH?labelSelector=kubeinfer.io/inferenceservice=NAME   observe children and pods
    GET    /apis/leaderworkerset.x-k8s.io/v1                             is LeaderWorkerSet served?
    GET    /apis/inference.networking.k8s.io/v1                          is InferencePool served?
    GET    OBJECT_PATH                                                   after AlreadyExists
    POST   LIST_PATH                                                     create
    PUT    OBJECT_PATH   (with metadata.resourceVersion)                 update, drift correction
    DELETE OBJECT_PATH   (propagationPolicy=Background)                  orphans, immutable changes
    GET    inferenceservices/NAME, merge PATCH inferenceservices/NAME/status (with
           metadata.resourceVersion: 409 when it changed since the GET)  status refresh on pod events
    merge PATCH inferenceservices/NAME {"spec": {"replicas": N}} (with
           metadata.resourceVersion)                                     spec.autoscaling
    GET    pods/NAME/log?tailLines=N                                     the model download's progress
    GET    pods/NAME:8000/proxy/metrics                                  autoscaling's scrape through
                                                                         the API server (--scrape-via)
    GET, POST, PUT leases/NAME (in the operator's namespace)             leader election (leader.py)
    GET, POST secrets/NAME-node-secret                                   pipeline > 1: made once
                                                                         (ensure_secret), never changed

Idempotent: AlreadyExists on create fetches the object and updates it (when it is ours), NotFound on
update creates it, NotFound on delete is success. The RBAC rules in charts/kubeinfer grant exactly
these verbs (get, list, watch, create, update, delete) on these resources, and patch on
inferenceservices and inferenceservices/status.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from kubeinfer.operator.metrics import API_ERRORS
from kubeinfer.operator.plan import Action, is_controlled_by
from kubeinfer.operator.render import LABEL_IS

# kind -> (API prefix, plural)
RESOURCES = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Service": ("/api/v1", "services"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "LeaderWorkerSet": ("/apis/leaderworkerset.x-k8s.io/v1", "leaderworkersets"),
    "InferencePool": ("/apis/inference.networking.k8s.io/v1", "inferencepools"),
    "Job": ("/apis/batch/v1", "jobs"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Pod": ("/api/v1", "pods"),
    "InferenceService": ("/apis/kubeinfer.io/v1alpha1", "inferenceservices"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    "Secret": ("/api/v1", "secrets"),
}
API_VERSIONS = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "Service": "v1",
                "PodDisruptionBudget": "policy/v1", "LeaderWorkerSet": "leaderworkerset.x-k8s.io/v1",
                "InferencePool": "inference.networking.k8s.io/v1", "Pod": "v1", "Job": "batch/v1",
                "PersistentVolumeClaim": "v1", "Secret": "v1",
                "InferenceService": "kubeinfer.io/v1alpha1", "Lease": "coordination.k8s.io/v1"}
RETRYABLE = {0, 403, 404, 408, 409, 429, 500, 502, 503, 504}


class ApiError(Exception):
    """An API call failed. `status` 0 means no HTTP answer (connection refused, timeout)."""

    def __init__(self, status: int, reason: str, message: str):
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {reason}: {message}" if status else f"no answer: {message}")

    @property
    def retryable(self) -> bool:
        """May pass by itself (or once an admin fixes RBAC); 400/422 mean the object is invalid."""
        return self.status in RETRYABLE or self.status >= 500

    @property
    def invalid(self) -> bool:
        return self.status in (400, 422)


class NotOurs(ApiError):
    """An object with a child's name exists and belongs to someone else."""


def _failure(status: int, reason: str, data) -> ApiError:
    """The ApiError of a failed answer, with reason and message from its Kubernetes Status body."""
    if isinstance(data, bytes):
        data = data.decode(errors="replace")
    try:
        payload = json.loads(data) if data else {}
    except ValueError:
        payload = {"message": str(data)[:200]}
    if not isinstance(payload, dict):
        payload = {"message": str(payload)[:200]}
    return _counted(ApiError(status, str(payload.get("reason") or reason),
                             str(payload.get("message") or payload or reason)))


def _counted(error: ApiError) -> ApiError:
    # 404 is an answer ("not there"), used by get/delete; every other failure is an error to count
    if error.status != 404:
        API_ERRORS.labels(str(error.status)).inc()
    return error


def _path(kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class KubeApi:
    """Blocking JSON calls; kopf runs sync handlers in its thread pool."""

    def __init__(self, api_client=None, timeout: float = 30.0):
        self._client = api_client
        self._lock = threading.Lock()
        self.timeout = timeout

    def _api_client(self):
        with self._lock:
            if self._client is None:
                from kubernetes import client, config
                try:
                    config.load_incluster_config()
                except config.ConfigException:
                    config.load_kube_config()   # KUBECONFIG or ~/.kube/config
                self._client = client.ApiClient()
            return self._client

    def request(self, method: str, path: str, body: dict | None = None,
                query: list[tuple[str, str]] | None = None, content_type: str = "application/json") -> dict:
        data = self._call(method, path, body, query, content_type, "application/json")
        try:
            return json.loads(data) if data else {}
        except ValueError:
            raise _counted(ApiError(502, "BadResponse", f"not JSON: {data[:200].decode(errors='replace')}")) \
                from None

    def request_text(self, path: str) -> str:
        """GET a text answer (a pod's /metrics through the API server's proxy)."""
        return self._call("GET", path, None, None, "application/json", "text/plain, */*").decode(
            "utf-8", errors="replace")

    def _call(self, method: str, path: str, body: dict | None, query: list[tuple[str, str]] | None,
              content_type: str, accept: str) -> bytes:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        c = self._api_client()
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        req = c.param_serialize(method, path, query_params=query or [], header_params=headers,
                                body=body, auth_settings=["BearerToken"])
        try:
            resp = c.call_api(*req, _request_timeout=self.timeout)
            data = resp.read()
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise _counted(ApiError(0, "Unreachable", str(e))) from None
        except ApiException as e:
            raise _failure(e.status or 0, str(e.reason), e.body) from None
        if not 200 <= resp.status < 300:
            raise _failure(resp.status, str(resp.reason), data)
        return data or b""

    # --- typed helpers ------------------------------------------------------------------------

    def list(self, kind: str, namespace: str, selector: str) -> list[dict]:
        data = self.request("GET", _path(kind, namespace), query=[("labelSelector", selector)])
        items = data.get("items") or []
        for item in items:   # list items come without apiVersion/kind
            item.setdefault("apiVersion", API_VERSIONS[kind])
            item.setdefault("kind", kind)
        return items

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self.request("GET", _path(kind, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def pod_log(self, namespace: str, name: str, tail_lines: int) -> str:
        """The last lines of a pod's (only) container's log."""
        return self._call("GET", _path("Pod", namespace, name) + "/log", None,
                          [("tailLines", str(tail_lines))], "application/json", "text/plain, */*"
                          ).decode("utf-8", errors="replace")

    def create(self, obj: dict) -> dict:
        meta = obj["metadata"]
        return self.request("POST", _path(obj["kind"], meta["namespace"]), body=obj)

    def replace(self, obj: dict) -> dict:
        meta = obj["metadata"]
        return self.request("PUT", _path(obj["kind"], meta["namespace"], meta["name"]), body=obj)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """False when it was already gone."""
        try:
            self.request("DELETE", _path(kind, namespace, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1",
                               "propagationPolicy": "Background"})
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def patch_status(self, kind: str, namespace: str, name: str, status: dict, resource_version: str) -> dict:
        """Merge `status` into the status subresource, only if the object is still at `resource_version`
        (409 Conflict otherwise): a status computed from an older read never overwrites a newer one."""
        return self.request("PATCH", _path(kind, namespace, name) + "/status",
                            body={"metadata": {"resourceVersion": resource_version}, "status": status},
                            content_type="application/merge-patch+json")

    def patch(self, kind: str, namespace: str, name: str, patch: dict, resource_version: str | None) -> dict:
        """Merge-patch the object (the autoscaler's spec.replicas); with `resource_version`, only if
        the object is still at it (409 Conflict otherwise)."""
        body = {**patch, "metadata": {**patch.get("metadata", {}), "resourceVersion": resource_version}} \
            if resource_version else patch
        return self.request("PATCH", _path(kind, namespace, name), body=body,
                            content_type="application/merge-patch+json")

    def serves(self, kind: str) -> bool:
        """Does the API serve this (custom) kind? 403/404/503 count as no."""
        prefix, plural = RESOURCES[kind]
        try:
            data = self.request("GET", prefix)
        except ApiError as e:
            if e.status in (403, 404, 503):   # not served, or not ours to see
                return False
            raise
        return any(r.get("name") == plural for r in data.get("resources") or [])

    def serves_leaderworkerset(self) -> bool:
        return self.serves("LeaderWorkerSet")   # else StatefulSets


def ensure_secret(api: KubeApi, obj: dict) -> bool:
    """Create the Secret `obj` unless one of its name exists (whatever its value: a Secret made
    once is kept, so running pods keep matching it). True when it was created now. Its data is
    never logged: errors name the Secret only."""
    meta = obj["metadata"]
    if api.get("Secret", meta["namespace"], meta["name"]) is not None:
        return False
    try:
        api.create(obj)
    except ApiError as e:
        if e.status == 409:   # created meanwhile (another replica of the operator)
            return False
        raise
    return True


def merged_for_update(desired: dict, current: dict) -> dict:
    """The PUT body: our desired object on top of what the server holds (its resourceVersion, other
    tools' labels and annotations, the Service's allocated cluster IPs)."""
    body = json.loads(json.dumps(desired))
    meta, cur = body["metadata"], current.get("metadata", {})
    meta["resourceVersion"] = cur.get("resourceVersion")
    meta["labels"] = {**(cur.get("labels") or {}), **meta.get("labels", {})}
    meta["annotations"] = {**(cur.get("annotations") or {}), **meta.get("annotations", {})}
    if body["kind"] == "Service":
        for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if key in current.get("spec", {}) and key not in body["spec"]:
                body["spec"][key] = current["spec"][key]
    return body


@dataclass(frozen=True)
class Done:
    """What one action did, for events: verb in created/updated/restored/recreated/deleted."""

    verb: str
    kind: str
    name: str


def _update(api: KubeApi, desired: dict, current: dict) -> None:
    try:
        api.replace(merged_for_update(desired, current))
    except ApiError as e:
        if e.status == 404:
            api.create(desired)
        elif e.status == 422 and "immutable" in e.message:
            _recreate(api, desired)
        else:
            raise


def _recreate(api: KubeApi, desired: dict) -> None:
    meta = desired["metadata"]
    api.delete(desired["kind"], meta["namespace"], meta["name"])
    api.create(desired)   # 409 while the old one is still going: retried by the caller


def _create(api: KubeApi, desired: dict, owner_uid: str | None) -> str:
    try:
        api.create(desired)
        return "created"
    except ApiError as e:
        if e.status != 409:
            raise
    meta = desired["metadata"]
    current = api.get(desired["kind"], meta["namespace"], meta["name"])
    if current is None:   # deleted in between
        api.create(desired)
        return "created"
    labels = current.get("metadata", {}).get("labels") or {}
    if not (is_controlled_by(current, owner_uid) or labels.get(LABEL_IS) == meta["labels"][LABEL_IS]):
        raise NotOurs(409, "AlreadyExists",
                      f"{desired['kind']} {meta['namespace']}/{meta['name']} already exists and is not "
                      f"managed by this InferenceService: delete it or rename the InferenceService")
    _update(api, desired, current)
    return "updated"


def execute(api: KubeApi, action: Action, owner_uid: str | None) -> Done:
    """Carry out one planned action idempotently; raises ApiError for what did not work."""
    obj, meta = action.obj, action.obj["metadata"]
    if action.verb == "create":
        verb = _create(api, obj, owner_uid)
    elif action.verb == "update":
        _update(api, obj, action.current or {})
        verb = "restored" if action.reason == "drifted" else "updated"
    elif action.verb == "recreate":
        _recreate(api, obj)
        verb = "recreated"
    elif action.verb == "delete":
        api.delete(obj["kind"], meta["namespace"], meta["name"])
        verb = "deleted"
    else:
        raise ValueError(f"unknown action {action.verb!r}")
    return Done(verb, obj["kind"], meta["name"])
