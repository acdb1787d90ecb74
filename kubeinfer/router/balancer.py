"""`Balancer`: which ready replica takes a request, by least load or by prefix hash.

least-load   the replica with the fewest requests in flight through this router; ties go to the
             one picked least recently, so an idle pool is used round-robin.
prefix-hash  consistent hashing with bounded loads (Mirrokni et al.; KubeAI's CHWBL): the request's
             key (a hash of its prompt's first characters or token ids, or of its chat prefix) is
             placed on a ring of `ring_replicas` virtual points per replica and walks clockwise to
             the first replica whose in-flight count + 1 stays within
             ceil(load_factor * (total in flight + 1) / replicas). The same conversation thus keeps
             its replica (and that replica's prefix cache) while the replica is not overloaded, and
             spills to the next one on the ring when it is. Adding or removing a replica moves only
             the keys whose arc it owned. With load_factor >= 1 some replica always fits.

In-flight counts are the router's own (`InFlight`): a request counts from the moment it is sent
upstream until its response ended. An InferenceService's spec.loadBalancing.prefixHash.loadFactor
(`Backend.load_factor`) wins over the router's --load-factor. Replicas `exclude`d (tried already,
or skipped as failing) are walked past, but stay on the ring so they keep their arcs when they
come back.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Collection, Iterator

from kubeinfer.router.endpoints import Backend, Endpoint


def hash64(data: str | bytes) -> int:
    """A hash stable across processes and router replicas (unlike Python's `hash`)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


class InFlight:
    """Requests in flight per replica address."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def get(self, address: str) -> int:
        return self._counts.get(address, 0)

    def add(self, address: str) -> None:
        self._counts[address] = self._counts.get(address, 0) + 1

    def done(self, address: str) -> None:
        left = self._counts.get(address, 0) - 1
        if left > 0:
            self._counts[address] = left
        else:
            self._counts.pop(address, None)

    def total(self) -> int:
        return sum(self._counts.values())


class HashRing:
    """`replicas` points per address on a 64-bit ring."""

    def __init__(self, addresses: Collection[str], replicas: int) -> None:
        points = sorted((hash64(f"{a}#{i}"), a) for a in addresses for i in range(replicas))
        self._hashes = [h for h, _ in points]
        self._owners = [a for _, a in points]
        self.addresses = frozenset(addresses)

    def walk(self, key_hash: int) -> Iterator[str]:
        """Each address once, clockwise from the first point at or after `key_hash`."""
        n = len(self._hashes)
        start = bisect.bisect_left(self._hashes, key_hash)
        seen: set[str] = set()
        for i in range(n):
            owner = self._owners[(start + i) % n]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.addresses):
                    return


def load_bound(loads: list[int], load_factor: float) -> int:
    """The most requests one replica may have once this request is placed."""
    return math.ceil(load_factor * (sum(loads) + 1) / len(loads))


class Balancer:
    def __init__(self, in_flight: InFlight, *, load_factor: float = 1.25, ring_replicas: int = 100):
        self.in_flight = in_flight
        self.load_factor = load_factor
        self.ring_replicas = ring_replicas
        self._rings: dict[str, HashRing] = {}
        self._picked = itertools.count(1)
        self._last_picked: dict[str, int] = {}

    def pick(self, backend: Backend, key: str | None, exclude: Collection[str] = ()) -> Endpoint | None:
        """A replica of `backend` not in `exclude`, or None when every one is excluded."""
        candidates = [e.address for e in backend.endpoints if e.address not in exclude]
        if not candidates:
            return None
        if backend.strategy == "prefix-hash" and key is not None:
            address = self._pick_prefix_hash(backend, key, candidates)
        else:
            address = min(candidates, key=lambda a: (self.in_flight.get(a), self._last_picked.get(a, 0)))
        self._last_picked[address] = next(self._picked)
        return Endpoint(address)

    def _ring(self, backend: Backend) -> HashRing:
        addresses = frozenset(e.address for e in backend.endpoints)
        ring = self._rings.get(backend.key)
        if ring is None or ring.addresses != addresses:
            ring = self._rings[backend.key] = HashRing(addresses, self.ring_replicas)
        return ring

    def _pick_prefix_hash(self, backend: Backend, key: str, candidates: list[str]) -> str:
        allowed = set(candidates)
        factor = backend.load_factor if backend.load_factor is not None else self.load_factor
        bound = load_bound([self.in_flight.get(a) for a in candidates], factor)
        for address in self._ring(backend).walk(hash64(key)):
            if address in allowed and self.in_flight.get(address) + 1 <= bound:
                return address
        # unreachable with load_factor >= 1 (the least-loaded candidate always fits); kept total
        return min(candidates, key=self.in_flight.get)
