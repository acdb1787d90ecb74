"""Writing an InferenceService's status and events outside kopf's change handlers: the status
refresh on pod and workload events (StatusFollower) and the restore of a deleted child (`publish`).

Both patch the status subresource with metadata.resourceVersion, so a status computed from an older
read never overwrites a newer one (409: read again, or leave it to the next round), and both run
under the object's lock (locks.py), so they never interleave with a reconcile of the same object.
"""
from __future__ import annotations

import asyncio
import logging

import kopf

from kubeinfer.operator import metrics
from kubeinfer.operator.apply import ApiError, KubeApi
from kubeinfer.operator.locks import ObjectLocks
from kubeinfer.operator.reconcile import LwsDiscovery, Outcome, refresh
from kubeinfer.operator.settings import OperatorSettings

STATUS_WINDOW = 0.3      # seconds: the events of one InferenceService within it make one refresh
CONFLICT_RETRIES = 3
log = logging.getLogger(__name__)


def publish(api: KubeApi, body: dict, outcome: Outcome, phases: metrics.PhaseTracker | None = None) -> bool:
    """Post the outcome's events and merge-patch its status when it differs from the body's, only if
    the object is still at the body's resourceVersion. True when patched; raises ApiError (409
    included) for the caller to decide."""
    meta, current = body["metadata"], body.get("status") or {}
    # what a merge patch would leave unchanged is not sent
    changed = {**current, **outcome.status} != current
    if changed:
        api.patch_status("InferenceService", meta["namespace"], meta["name"], outcome.status,
                         meta["resourceVersion"])
    # after the patch: a 409 reads again and computes the events again
    for type_, reason, message in outcome.events:
        kopf.event(body, type=type_, reason=reason, message=message)
    if phases is not None and outcome.status.get("phase"):
        phases.set(meta["namespace"], meta["name"], outcome.status["phase"])
    return changed


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
                 window: float = STATUS_WINDOW, locks: ObjectLocks | None = None,
                 phases: metrics.PhaseTracker | None = None):
        self.api, self.settings, self.lws, self.window = api, settings, lws, window
        self.locks, self.phases = (ObjectLocks() if locks is None else locks), phases
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
        with self.locks.hold(namespace, name), metrics.reconciling("refresh") as timed:
            for _ in range(CONFLICT_RETRIES):
                body = self.api.get("InferenceService", namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    return False
                meta, current = body["metadata"], body.get("status") or {}
                if current.get("observedGeneration") != meta.get("generation"):
                    return False   # the reconcile handler has this generation to do, and writes its status
                outcome = refresh(self.api, body, self.settings, self.lws)
                try:
                    return publish(self.api, body, outcome, self.phases)
                except ApiError as e:
                    if e.status == 409:
                        continue   # written since the GET (a reconcile, kopf's annotations): read again
                    timed.result = "error"
                    raise
            return False
