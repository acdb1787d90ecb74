"""Leader election among operator replicas with a coordination.k8s.io/v1 Lease, as client-go does.

The leader holds Lease `kubeinfer-operator` in the operator's namespace (holderIdentity = this
replica) and renews it every RENEW_SECONDS; a candidate takes it over only when the holder has not
renewed for leaseDurationSeconds *as measured on the candidate's own clock* (from when it last saw
the record change), so clock skew between nodes does not matter. Writes carry metadata.resourceVersion:
of two candidates racing for an expired lease exactly one PUT succeeds (the other gets 409).

A leader that cannot renew for LEASE_SECONDS - RENEW_SECONDS stops (its stop flag is set), so it is
gone before anyone else may take over; the process then exits non-zero and the kubelet restarts it
as a candidate. On a clean shutdown the leader empties holderIdentity so a standby takes over at once.

`claim` is the pure rule; `LeaderElector` does the calls (blocking, through apply.KubeApi).
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import time
import uuid
from collections.abc import Callable

from kubeinfer.operator import metrics
from kubeinfer.operator.apply import ApiError, KubeApi

LEASE_NAME = "kubeinfer-operator"
LEASE_SECONDS = 15
RENEW_SECONDS = 5
log = logging.getLogger(__name__)


def micro_time(t: float) -> str:
    """A Kubernetes MicroTime."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    # the pod name is the host name; the suffix tells a restarted container from its predecessor
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def claim(current: dict | None, identity: str, now: str, lease_seconds: int, expired: bool) -> dict | None:
    """The Lease spec to write so that `identity` holds the lease, or None while another holder's
    lease is valid. `current` is the Lease's spec (None: no Lease yet); `expired` says whether its
    holder has been silent for its leaseDurationSeconds (LeaderElector measures that)."""
    if current is None:
        return {"holderIdentity": identity, "leaseDurationSeconds": lease_seconds, "acquireTime": now,
                "renewTime": now, "leaseTransitions": 0}
    holder = current.get("holderIdentity") or ""
    if holder == identity:
        return {**current, "renewTime": now, "leaseDurationSeconds": lease_seconds}
    if holder and not expired:
        return None
    return {"holderIdentity": identity, "leaseDurationSeconds": lease_seconds, "acquireTime": now,
            "renewTime": now, "leaseTransitions": int(current.get("leaseTransitions") or 0) + 1}


class LeaderElector:
    def __init__(self, api: KubeApi, namespace: str, identity: str | None = None, *, name: str = LEASE_NAME,
                 lease_seconds: int = LEASE_SECONDS, renew_seconds: float = RENEW_SECONDS,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.api, self.namespace, self.name = api, namespace, name
        self.identity = identity or default_identity()
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.clock, self.wall = clock, wall
        self.lost = False
        self._seen: tuple | None = None      # (holder, renewTime) as last read
        self._seen_at = 0.0                  # our clock when it last changed
        self._renewed_at: float | None = None

    @property
    def is_leader(self) -> bool:
        return self._renewed_at is not None and not self.lost

    def try_acquire(self) -> bool:
        """One round: read the Lease, and take or renew it when the rule allows. True when this
        replica holds it now. Raises ApiError for failed calls other than a lost race (409)."""
        lease = self.api.get("Lease", self.namespace, self.name)
        spec = (lease or {}).get("spec") or {}
        now = self.clock()
        record = (spec.get("holderIdentity"), spec.get("renewTime"))
        if record != self._seen:
            self._seen, self._seen_at = record, now
        duration = int(spec.get("leaseDurationSeconds") or self.lease_seconds)
        want = claim(spec if lease is not None else None, self.identity, micro_time(self.wall()),
                     self.lease_seconds, expired=now - self._seen_at >= duration)
        if want is None:
            return False
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": want}
        try:
            if lease is None:
                self.api.create(body)
            else:
                body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
                self.api.replace(body)
        except ApiError as e:
            if e.status == 409:
                return False   # another candidate wrote first
            raise
        if self._renewed_at is None:
            log.info(f"leader election: {self.identity} holds Lease {self.namespace}/{self.name}")
        self._renewed_at = now
        metrics.LEADER.set(1)
        return True

    def _round(self) -> bool:
        try:
            return self.try_acquire()
        except ApiError as e:
            log.warning(f"leader election: Lease {self.namespace}/{self.name}: {e}")
            return False

    async def acquire(self) -> None:
        """Wait until this replica is the leader."""
        log.info(f"leader election: {self.identity} waiting for Lease {self.namespace}/{self.name}")
        while not await asyncio.to_thread(self._round):
            await asyncio.sleep(self.renew_seconds)

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew until `stop` is set; when renewing fails for too long, mark the lease lost and set
        `stop` (the operator must not act once someone else may have taken over)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.renew_seconds)
                break
            except asyncio.TimeoutError:
                pass
            if await asyncio.to_thread(self._round):
                continue
            if self._renewed_at is None or self.clock() - self._renewed_at >= self.lease_seconds - self.renew_seconds:
                log.error(f"leader election: lost Lease {self.namespace}/{self.name}; stopping")
                self.lost = True
                metrics.LEADER.set(0)
                stop.set()
                return

    def release(self) -> None:
        """Give the lease up at a clean shutdown, so a standby takes over without waiting."""
        if not self.is_leader:
            return
        try:
            lease = self.api.get("Lease", self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                self.api.replace(lease)
        except ApiError as e:
            log.warning(f"leader election: could not release Lease {self.namespace}/{self.name}: {e}")
        self._renewed_at = None
        metrics.LEADER.set(0)
