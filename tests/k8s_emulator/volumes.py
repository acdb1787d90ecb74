"""PersistentVolumeClaims bind at once: a claim without status.phase Bound gets it (with the access
modes and capacity it asked for). No PersistentVolumes, storage classes or topology: the stand-in
kubelet gives each claim one local directory (podenv.volume_dirs)."""
from __future__ import annotations

import logging
from typing import Any

from .errors import ApiError
from .reconcile_loop import reconcile_loop
from .store import Store

log = logging.getLogger(__name__)


class ClaimBinder:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.claims = store.registry.lookup("", "v1", "persistentvolumeclaims")

    async def run(self) -> None:
        await reconcile_loop(self.store, {("", "persistentvolumeclaims")}, 1.0,
                             self.reconcile_all, "claim binder")

    def reconcile_all(self) -> None:
        for claim in self.store.items(self.claims):
            if (claim.get("status") or {}).get("phase") != "Bound":
                self._bind(claim)

    def _bind(self, claim: dict[str, Any]) -> None:
        spec = claim.get("spec") or {}

        def mutate(current: dict[str, Any]) -> dict[str, Any]:
            current["status"] = {"phase": "Bound", "accessModes": list(spec.get("accessModes") or []),
                                 "capacity": dict((spec.get("resources") or {}).get("requests") or {})}
            return current
        try:
            self.store.update(self.claims, claim["metadata"]["namespace"], claim["metadata"]["name"], mutate, "status")
        except ApiError as e:
            if e.code != 404:
                raise
