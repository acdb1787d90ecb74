"""Injected API failures: a share of the requests answered with an error, as an overloaded or
flapping API server (or a broken etcd) answers them.

    emu.server.faults = Faults(0.3, exempt=lambda request: request.headers.get("User-Agent") == "test")
    ...
    emu.server.faults = None     # the outage is over

The failing requests are picked by a seeded random generator, so a run is repeatable in what
share fails (not in which request: the order requests arrive in is not).
"""
from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from .errors import ApiError

ERRORS = (
    (500, "InternalError", "etcdserver: request timed out"),
    (503, "ServiceUnavailable", "the server is currently unable to handle the request"),
    (429, "TooManyRequests", "the server has received too many requests and has asked us to try again later"),
)


class Faults:
    def __init__(self, rate: float, *, seed: int = 0, exempt: Callable[[Any], bool] = lambda request: False,
                 errors: tuple[tuple[int, str, str], ...] = ERRORS) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.rate, self.exempt, self.errors = rate, exempt, errors
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.failed = 0
        self.passed = 0

    def pick(self, request: Any) -> ApiError | None:
        """The error to answer `request` with, or None to serve it."""
        if self.exempt(request):
            return None
        with self._lock:
            if self._random.random() >= self.rate:
                self.passed += 1
                return None
            self.failed += 1
            code, reason, message = self._random.choice(self.errors)
        return ApiError(code, reason, f"{message} (injected by the emulator)")
