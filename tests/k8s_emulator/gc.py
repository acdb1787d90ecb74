"""The garbage collector and its kin: owner-reference cascades, orphaning, foreground deletion, the
namespace controller (a deleted namespace empties, then goes) and CRD cleanup (a deleted CRD deletes its
custom resources, then goes).

Like the real one it is level-triggered and asynchronous: after every change (and once a second) it sweeps
the whole store and deletes each object whose owners, by uid, are all gone.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from .admission import CRD_CLEANUP_FINALIZER
from .errors import ApiError
from .resources import ResourceType, types_from_crd
from .store import Store

log = logging.getLogger(__name__)


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["metadata"]


class GarbageCollector:
    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        unsubscribe = self.store.add_listener(lambda ev: loop.call_soon_threadsafe(wake.set))
        try:
            while True:
                try:
                    await asyncio.wait_for(wake.wait(), self.interval)
                except asyncio.TimeoutError:
                    pass
                wake.clear()
                try:
                    self.sweep()
                except Exception:  # keep collecting; a bug here shows up as objects that never go
                    log.exception("garbage collector sweep failed")
        finally:
            unsubscribe()

    def _delete(self, rt: ResourceType, obj: dict[str, Any], propagation: str | None = None) -> None:
        try:
            self.store.delete(rt, _meta(obj).get("namespace"), _meta(obj)["name"], propagation,
                              preconditions={"uid": _meta(obj)["uid"]})
        except ApiError as e:
            if e.code not in (404, 409):
                raise

    def _drop_finalizer(self, rt: ResourceType, obj: dict[str, Any], finalizer: str) -> None:
        def mutate(current: dict[str, Any]) -> dict[str, Any]:
            current["metadata"]["finalizers"] = [f for f in current["metadata"].get("finalizers", [])
                                                 if f != finalizer]
            return current
        self._update_if_present(rt, obj, mutate)

    def _drop_owner_ref(self, rt: ResourceType, obj: dict[str, Any], owner_uid: str) -> None:
        def mutate(current: dict[str, Any]) -> dict[str, Any]:
            refs = [r for r in current["metadata"].get("ownerReferences", []) if r.get("uid") != owner_uid]
            if refs:
                current["metadata"]["ownerReferences"] = refs
            else:
                current["metadata"].pop("ownerReferences", None)
            return current
        self._update_if_present(rt, obj, mutate)

    def _update_if_present(self, rt: ResourceType, obj: dict[str, Any], mutate) -> None:
        try:
            self.store.update(rt, _meta(obj).get("namespace"), _meta(obj)["name"], mutate)
        except ApiError as e:
            if e.code != 404:  # already gone: nothing left to change
                raise

    def sweep(self) -> None:
        objects = self.store.all_objects()
        by_uid = {_meta(obj)["uid"]: (rt, obj) for rt, obj in objects}
        dependents: dict[str, list[tuple[ResourceType, dict[str, Any]]]] = {}
        for rt, obj in objects:
            for ref in _meta(obj).get("ownerReferences") or []:
                dependents.setdefault(ref.get("uid", ""), []).append((rt, obj))

        for rt, obj in objects:
            meta = _meta(obj)
            refs = meta.get("ownerReferences") or []
            if refs and not any(ref.get("uid") in by_uid for ref in refs) and not meta.get("deletionTimestamp"):
                self._delete(rt, obj)  # every owner is gone: background cascade
            if not meta.get("deletionTimestamp"):
                continue
            finalizers = meta.get("finalizers") or []
            mine = dependents.get(meta["uid"], [])
            if "orphan" in finalizers:
                for dep_rt, dep in mine:
                    self._drop_owner_ref(dep_rt, dep, meta["uid"])
                self._drop_finalizer(rt, obj, "orphan")
            if "foregroundDeletion" in finalizers:
                live = [(d_rt, d) for d_rt, d in mine if not _meta(d).get("deletionTimestamp")]
                for dep_rt, dep in live:
                    self._delete(dep_rt, dep, "Foreground")
                if not mine:
                    self._drop_finalizer(rt, obj, "foregroundDeletion")
            if rt.kind == "Namespace":
                self._empty_namespace(meta["name"], objects)
            if rt.kind == "CustomResourceDefinition" and CRD_CLEANUP_FINALIZER in finalizers:
                self._clean_crd(rt, obj)

    def _empty_namespace(self, namespace: str, objects: list[tuple[ResourceType, dict[str, Any]]]) -> None:
        inside = [(rt, obj) for rt, obj in objects if rt.namespaced and _meta(obj).get("namespace") == namespace]
        for rt, obj in inside:
            if not _meta(obj).get("deletionTimestamp"):
                self._delete(rt, obj)
        if not inside:
            self.store.finalize_namespace(namespace)

    def _clean_crd(self, crd_rt: ResourceType, crd: dict[str, Any]) -> None:
        types = types_from_crd(crd)
        remaining = []
        for rt in types[:1]:  # all versions share one storage
            remaining = self.store.items(rt)
            for obj in remaining:
                if not _meta(obj).get("deletionTimestamp"):
                    self._delete(rt, obj)
        if not remaining:
            self._drop_finalizer(crd_rt, crd, CRD_CLEANUP_FINALIZER)
