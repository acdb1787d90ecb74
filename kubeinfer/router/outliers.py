"""`OutlierDetector`: replicas that fail repeatedly are skipped for a while.

A failure is what the proxy retries: a connection that could not be made or broke before the first
byte of the answer, or a 503. `max_failures` failures in a row eject a replica for `eject_seconds`;
afterwards it is tried again, and one more failure ejects it again at once (its count is kept),
while one success clears it. The EndpointSlice drops a dead pod within seconds anyway; this covers
the gap and replicas that are up but failing.
"""
from __future__ import annotations

import time
from collections.abc import Callable


class OutlierDetector:
    def __init__(self, max_failures: int = 3, eject_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.eject_seconds = eject_seconds
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}

    def failure(self, address: str) -> bool:
        """Count a failure; True when it ejects the replica."""
        count = self._failures.get(address, 0) + 1
        self._failures[address] = count
        if count >= self.max_failures:
            self._ejected_until[address] = self._clock() + self.eject_seconds
            return True
        return False

    def success(self, address: str) -> None:
        self._failures.pop(address, None)
        self._ejected_until.pop(address, None)

    def is_ejected(self, address: str) -> bool:
        until = self._ejected_until.get(address)
        return until is not None and self._clock() < until

    def ejected(self, addresses: list[str]) -> set[str]:
        return {a for a in addresses if self.is_ejected(a)}
