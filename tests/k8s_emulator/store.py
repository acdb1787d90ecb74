"""The emulator's etcd: objects in memory, one global resourceVersion counter, and a bounded history of
watch events so that a watch can resume from a resourceVersion (or get 410 Gone when it is too old).

Every method is thread-safe (one re-entrant lock): the HTTP server, the controllers and the test thread
all use the same store. Listeners are called under the lock, in commit order, and must only schedule work.
"""
from __future__ import annotations

import base64
import collections
import copy
import dataclasses
import random
import threading
from collections.abc import Callable
from typing import Any

from . import admission, patching
from .errors import ApiError
from .resources import Registry, ResourceType
from .selectors import object_matcher

Key = tuple[str, str]  # (group, plural)
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    key: Key
    namespace: str | None
    obj: dict[str, Any]  # the new state; for DELETED the last state. Never mutate.
    old: dict[str, Any] | None  # the previous state (MODIFIED, DELETED)


def random_suffix(n: int = 5) -> str:
    return "".join(random.choice(_NAME_CHARS) for _ in range(n))


class Store:
    def __init__(self, registry: Registry | None = None, history_size: int = 10000) -> None:
        self.registry = registry or Registry()
        self.lock = threading.RLock()
        self._objects: dict[Key, dict[tuple[str | None, str], dict[str, Any]]] = collections.defaultdict(dict)
        self._rv = 0
        self._history: collections.deque[WatchEvent] = collections.deque()
        self._history_size = history_size
        self.compacted_rv = 0  # events up to this resourceVersion are no longer in the history
        self._listeners: list[Callable[[WatchEvent], None]] = []
        self._applied: dict[str, dict[str, dict[str, Any]]] = {}  # uid -> field manager -> last applied
        self.graceful_pod_deletion = False  # a kubelet finishes pod deletion; without one it is immediate

    # ---- plumbing ----
    @property
    def resource_version(self) -> int:
        return self._rv

    def add_listener(self, listener: Callable[[WatchEvent], None]) -> Callable[[], None]:
        with self.lock:
            self._listeners.append(listener)
        return lambda: self._remove_listener(listener)

    def _remove_listener(self, listener: Callable[[WatchEvent], None]) -> None:
        with self.lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def events_since(self, rv: int) -> list[WatchEvent]:
        """Events after `rv`, or 410 Gone when some of them have already been compacted away."""
        with self.lock:
            if rv < self.compacted_rv:
                raise ApiError.gone(f"too old resource version: {rv} ({self.compacted_rv + 1})")
            return [ev for ev in self._history if ev.rv > rv]

    def compact(self) -> None:
        """Forget the whole history, as etcd compaction does (for tests of 410 Gone)."""
        with self.lock:
            self._history.clear()
            self.compacted_rv = self._rv

    def _commit(self, rt: ResourceType, event_type: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        meta = obj["metadata"]
        slot = (meta.get("namespace"), meta["name"])
        if event_type == "DELETED":
            self._objects[rt.storage_key].pop(slot, None)
            self._applied.pop(meta.get("uid", ""), None)
        else:
            self._objects[rt.storage_key][slot] = obj
        event = WatchEvent(self._rv, event_type, rt.storage_key, meta.get("namespace"), copy.deepcopy(obj),
                           copy.deepcopy(old) if old is not None else None)
        self._history.append(event)
        while len(self._history) > self._history_size:
            self.compacted_rv = self._history.popleft().rv
        for listener in list(self._listeners):
            listener(event)

    def _raw(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._objects[rt.storage_key].get((namespace if rt.namespaced else None, name))
        if obj is None:
            raise ApiError.not_found(rt.plural, name, rt.group)
        return obj

    @staticmethod
    def present(rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy as the client sees it, in the API version it asked for."""
        result = copy.deepcopy(obj)
        result["apiVersion"], result["kind"] = rt.api_version, rt.kind
        return result

    # ---- reads ----
    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        with self.lock:
            return self.present(rt, self._raw(rt, namespace, name))

    def try_get(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.get(rt, namespace, name)
        except ApiError:
            return None

    def list(self, rt: ResourceType, namespace: str | None = None, label_selector: str | None = None,
             field_selector: str | None = None, limit: int | None = None, continue_token: str | None = None,
             ) -> dict[str, Any]:
        matches = object_matcher(label_selector, field_selector)
        with self.lock:
            items = [self.present(rt, obj) for (ns, _), obj in sorted(self._objects[rt.storage_key].items(),
                                                                        key=lambda kv: (kv[0][0] or "", kv[0][1]))
                     if (namespace is None or ns == namespace) and matches(obj)]
            rv = self._rv
        start = int(base64.b64decode(continue_token).decode()) if continue_token else 0
        end = start + limit if limit else len(items)
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        if end < len(items):
            metadata["continue"] = base64.b64encode(str(end).encode()).decode()
            metadata["remainingItemCount"] = len(items) - end
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": metadata,
                "items": items[start:end]}

    def items(self, rt: ResourceType, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.list(rt, namespace)["items"]

    def find_uid(self, uid: str) -> tuple[ResourceType, dict[str, Any]] | None:
        with self.lock:
            types = self.registry.storage_types()
            for key, objects in self._objects.items():
                for obj in objects.values():
                    if obj["metadata"].get("uid") == uid and key in types:
                        return types[key], copy.deepcopy(obj)
        return None

    def all_objects(self) -> list[tuple[ResourceType, dict[str, Any]]]:
        with self.lock:
            types = self.registry.storage_types()
            return [(types[key], copy.deepcopy(obj)) for key, objects in self._objects.items() if key in types
                    for obj in objects.values()]

    # ---- writes ----
    def create(self, rt: ResourceType, namespace: str | None, body: Any, dry_run: bool = False) -> dict[str, Any]:
        with self.lock:
            obj = admission.prepare_create(rt, namespace, _with_name(self, rt, namespace, body))
            meta = obj["metadata"]
            if rt.namespaced:
                ns_obj = self._objects[("", "namespaces")].get((None, namespace))
                if ns_obj is None:
                    raise ApiError.not_found("namespaces", namespace or "")
                if ns_obj["metadata"].get("deletionTimestamp"):
                    raise ApiError.forbidden(rt.plural, meta["name"], f"unable to create new content in namespace "
                                             f"{namespace} because it is being terminated")
            if (meta.get("namespace"), meta["name"]) in self._objects[rt.storage_key]:
                raise ApiError.already_exists(rt.plural, meta["name"], rt.group)
            if dry_run:
                return self.present(rt, obj)
            if rt.kind == "CustomResourceDefinition":
                self.registry.set_crd(obj)
            self._commit(rt, "ADDED", obj, None)
            return self.present(rt, obj)

    def update(self, rt: ResourceType, namespace: str | None, name: str, mutate: Callable[[dict[str, Any]], Any],
               subresource: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Read-modify-write: `mutate(copy_of_current)` returns the requested new body."""
        with self.lock:
            old = self._raw(rt, namespace, name)
            requested = mutate(copy.deepcopy(old))
            wanted_rv = (requested.get("metadata") or {}).get("resourceVersion") if isinstance(requested, dict) \
                else None
            if wanted_rv and str(wanted_rv) != old["metadata"]["resourceVersion"]:
                raise ApiError.conflict(rt.plural, name, "the object has been modified; please apply your changes "
                                        "to the latest version and try again", rt.group)
            new = admission.prepare_update(rt, old, requested, subresource)
            if new == old or dry_run:
                return self.present(rt, new)
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                self._remove(rt, new, old)
            else:
                if rt.kind == "CustomResourceDefinition":
                    self.registry.set_crd(new)
                self._commit(rt, "MODIFIED", new, old)
            return self.present(rt, new)

    def replace(self, rt: ResourceType, namespace: str | None, name: str, body: Any,
                subresource: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        return self.update(rt, namespace, name, lambda old: body, subresource, dry_run)

    def patch(self, rt: ResourceType, namespace: str | None, name: str, content_type: str, patch: Any,
              subresource: str | None = None, field_manager: str | None = None, dry_run: bool = False,
              ) -> dict[str, Any]:
        content_type = content_type.split(";")[0].strip()
        if content_type in (patching.APPLY_YAML, patching.APPLY_JSON):
            return self._apply(rt, namespace, name, patch, subresource, field_manager or "", dry_run)
        if content_type == patching.STRATEGIC and rt.is_custom:
            raise ApiError.unsupported_media_type(content_type)
        functions = {patching.MERGE: patching.merge_patch, patching.STRATEGIC: patching.strategic_merge_patch,
                     patching.JSON_PATCH: patching.json_patch}
        if content_type not in functions:
            raise ApiError.unsupported_media_type(content_type)
        if content_type != patching.JSON_PATCH and not isinstance(patch, dict):
            raise ApiError.bad_request("a merge patch must be a JSON object")
        return self.update(rt, namespace, name, lambda old: functions[content_type](old, patch), subresource,
                           dry_run)

    def _apply(self, rt: ResourceType, namespace: str | None, name: str, config: Any, subresource: str | None,
               manager: str, dry_run: bool) -> dict[str, Any]:
        if not manager:
            raise ApiError.bad_request("PATCH with apply-patch requires a fieldManager query parameter")
        if not isinstance(config, dict):
            raise ApiError.bad_request("an apply patch must be an object")
        with self.lock:
            current = self._objects[rt.storage_key].get((namespace if rt.namespaced else None, name))
            if current is None:
                created = self.create(rt, namespace, {**config, "metadata": {**config.get("metadata", {}),
                                                                             "name": name}}, dry_run)
                if not dry_run:
                    self._applied.setdefault(created["metadata"]["uid"], {})[manager] = copy.deepcopy(config)
                return created
            uid = current["metadata"]["uid"]
            previous = self._applied.get(uid, {}).get(manager, {})
            result = self.update(rt, namespace, name,
                                 lambda old: patching.server_side_apply(old, previous, config), subresource, dry_run)
            if not dry_run:
                self._applied.setdefault(uid, {})[manager] = copy.deepcopy(config)
            return result

    def delete(self, rt: ResourceType, namespace: str | None, name: str, propagation: str | None = None,
               grace_period: int | None = None, preconditions: dict[str, Any] | None = None,
               dry_run: bool = False) -> dict[str, Any]:
        """Delete now, or mark for deletion (deletionTimestamp) while finalizers or a kubelet still hold it."""
        with self.lock:
            old = self._raw(rt, namespace, name)
            meta = old["metadata"]
            for key in ("uid", "resourceVersion"):
                if (preconditions or {}).get(key) not in (None, meta.get(key)):
                    raise ApiError.conflict(rt.plural, name, f"Precondition failed: {key} in precondition: "
                                            f"{preconditions[key]}, {key} in object meta: {meta.get(key)}", rt.group)
            if dry_run:
                return self.present(rt, old)
            new = copy.deepcopy(old)
            finalizers = new["metadata"].setdefault("finalizers", [])
            if meta.get("deletionTimestamp"):
                # already terminating: only a kubelet's (or a forced) grace-0 delete of a pod finishes it
                if rt.kind == "Pod" and grace_period == 0 and not finalizers:
                    del new["metadata"]["finalizers"]
                    self._remove(rt, new, old)
                    return self.present(rt, new)
                return self.present(rt, old)
            if propagation == "Orphan":
                finalizers.append("orphan")
            elif propagation == "Foreground":
                finalizers.append("foregroundDeletion")
            graceful_pod = bool(rt.kind == "Pod" and self.graceful_pod_deletion and grace_period != 0
                                and (new.get("spec") or {}).get("nodeName")
                                and (new.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))
            if rt.kind == "Namespace":
                new["status"] = {"phase": "Terminating"}  # spec.finalizers holds it until the namespace is empty
            if finalizers or graceful_pod or rt.kind == "Namespace":
                grace = 0
                if graceful_pod:
                    grace = int(grace_period if grace_period is not None
                                else new["spec"].get("terminationGracePeriodSeconds", 30))
                new["metadata"]["deletionTimestamp"] = admission.now()
                new["metadata"]["deletionGracePeriodSeconds"] = grace
                new["metadata"]["generation"] = int(meta.get("generation", 1)) + 1
                if not finalizers:
                    del new["metadata"]["finalizers"]
                self._commit(rt, "MODIFIED", new, old)
                return self.present(rt, new)
            del new["metadata"]["finalizers"]
            self._remove(rt, new, old)
            return self.present(rt, new)

    def finalize_namespace(self, name: str) -> None:
        """The namespace controller's last step: the namespace is empty, remove it."""
        with self.lock:
            rt = self.registry.lookup("", "v1", "namespaces")
            assert rt is not None
            old = self._objects[rt.storage_key].get((None, name))
            if old is not None and old["metadata"].get("deletionTimestamp") and not old["metadata"].get("finalizers"):
                self._remove(rt, copy.deepcopy(old), old)

    def _remove(self, rt: ResourceType, obj: dict[str, Any], old: dict[str, Any]) -> None:
        if rt.kind == "CustomResourceDefinition":
            self.registry.remove_crd(obj["metadata"]["name"])
        self._commit(rt, "DELETED", obj, old)


def _with_name(store: Store, rt: ResourceType, namespace: str | None, body: Any) -> Any:
    """Settle metadata.name from generateName, as the server does before admission."""
    if not isinstance(body, dict):
        return body
    meta = body.get("metadata") or {}
    if meta.get("name"):
        return body
    prefix = meta.get("generateName")
    if not prefix:
        raise ApiError.invalid(rt.kind, "", [("metadata.name", "Required value: name or generateName is "
                                              "required")], rt.group)
    taken = store._objects[rt.storage_key]
    ns = namespace if rt.namespaced else None
    while True:
        name = f"{prefix}{random_suffix()}"
        if (ns, name) not in taken:
            return {**body, "metadata": {**meta, "name": name}}
