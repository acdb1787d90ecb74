"""`RouterQueue`: how many requests the kubeinfer router holds for each InferenceService.

The router holds a request while its model has no ready replica (kubeinfer/router/queue.py) and
reports the counts at GET ROUTER_URL/queue:

    {"models": [{"model", "namespace", "inferenceservice", "held", "in_flight", "ready_replicas"}]}

The autoscaler adds `held` to an InferenceService's load (autoscale.py), so requests waiting for a
replica count before any pod exists: that is what scales a model up from zero. The router's
`in_flight` is not added: those requests are already running on a replica, whose own
vllm:num_requests_* count them.

One read serves every InferenceService for `max_age` seconds (the autoscale timer ticks once a
second per InferenceService). A router that cannot be read counts as holding nothing, logged once
per failure streak: the autoscaler goes on with the pods' load.

With several router replicas behind one Service each read reaches one of them, so a request held
by another is seen on a later read (a second or so apart while at zero), not at once.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable

READ_TIMEOUT = 2.0   # seconds
MAX_AGE = 0.5        # seconds one reading is reused
log = logging.getLogger(__name__)

Held = dict[tuple[str, str], int]   # (namespace, inferenceservice) -> requests held


def parse_queue(payload: object) -> Held:
    """The held counts of a GET /queue answer; ValueError when it has not that shape."""
    rows = payload.get("models") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise ValueError('expected {"models": [...]} from the router\'s /queue')
    held: Held = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        ns, name, n = row.get("namespace"), row.get("inferenceservice"), row.get("held")
        # rows held before the router's first sync have no namespace yet: nothing to scale
        if not ns or not name or isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            continue
        held[(ns, name)] = held.get((ns, name), 0) + n
    return held


def fetch_queue(url: str, timeout: float = READ_TIMEOUT) -> Held:
    """GET URL/queue; raises OSError or ValueError."""
    with urllib.request.urlopen(url.rstrip("/") + "/queue", timeout=timeout) as resp:
        return parse_queue(json.loads(resp.read().decode("utf-8", errors="replace")))


class RouterQueue:
    def __init__(self, url: str, *, fetch: Callable[[str], Held] = fetch_queue,
                 clock: Callable[[], float] = time.monotonic, max_age: float = MAX_AGE) -> None:
        self.url, self.fetch, self.clock, self.max_age = url, fetch, clock, max_age
        self._held: Held = {}
        self._at: float | None = None
        self._failing = False

    def held(self, namespace: str, name: str) -> int:
        """Requests the router holds for this InferenceService now (0 when it cannot be read)."""
        now = self.clock()
        if self._at is None or now - self._at >= self.max_age:
            self._at = now
            try:
                self._held = self.fetch(self.url)
            except Exception as e:   # never stop the autoscaler; the pods' load still counts
                if not self._failing:
                    log.warning(f"cannot read the router's held requests at {self.url}/queue: {e}; "
                                "counting none until it answers (scale from zero waits for it)")
                self._failing, self._held = True, {}
            else:
                if self._failing:
                    log.info(f"the router at {self.url} answers again")
                self._failing = False
        return self._held.get((namespace, name), 0)
