"""`HoldQueue`: requests for a model with no ready replica wait here (scale from zero).

A request is held until its model has a ready replica (then it is forwarded), until
`max_queue_wait` seconds pass (503 with Retry-After), or until its model stops being served (404).
At most `max_queue_size` requests are held per model; one more is answered 503 at once. Before the
endpoint source wrote its first table every model is unknown rather than absent, so requests are
held then too instead of answered 404.

The number held per model is the scale-from-zero signal: `held()` feeds GET /queue and the
`kubeinfer_router_queued_requests` gauge, which the operator's autoscaler reads (see the package
docstring). The router never writes spec.replicas itself.
"""
from __future__ import annotations

import time

from kubeinfer.router.endpoints import Backend, EndpointTable
from kubeinfer.router.metrics import RouterMetrics


class Unavailable(Exception):
    """Held too long or queue full: answer 503 with Retry-After."""


class UnknownModel(Exception):
    """No InferenceService serves this name."""


class HoldQueue:
    def __init__(self, table: EndpointTable, metrics: RouterMetrics, *, max_size: int,
                 max_wait: float) -> None:
        self.table = table
        self.metrics = metrics
        self.max_size = max_size
        self.max_wait = max_wait
        self._held: dict[tuple[str, str, str], int] = {}

    def held(self) -> dict[tuple[str, str, str], int]:
        """(model, namespace, inferenceservice) -> requests held now; only those above zero."""
        return dict(self._held)

    def held_for(self, model: str) -> int:
        return sum(n for (m, _, _), n in self._held.items() if m == model)

    def _lookup(self, model: str) -> Backend | None:
        backend = self.table.get(model)
        if backend is None and self.table.synced:
            raise UnknownModel(model)
        return backend

    async def wait_ready(self, model: str) -> Backend:
        """The model's backend once it has a ready replica; raises Unavailable or UnknownModel."""
        backend = self._lookup(model)
        if backend is not None and backend.endpoints:
            return backend
        if self.held_for(model) >= self.max_size:
            raise Unavailable(f"{self.max_size} requests for model {model!r} are already waiting for a "
                              "replica to start; try again later")
        labels = (model, backend.namespace, backend.inference_service) if backend else (model, "", "")
        self._change(labels, +1)
        start = time.monotonic()
        try:
            while True:
                remaining = start + self.max_wait - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(f"no replica of model {model!r} became ready within "
                                      f"{self.max_wait:g} s; it may still be starting, try again later")
                await self.table.wait_for_change(remaining)
                backend = self._lookup(model)
                if backend is not None and backend.endpoints:
                    self.metrics.queue_wait.labels(model).observe(time.monotonic() - start)
                    return backend
        finally:
            self._change(labels, -1)

    def _change(self, labels: tuple[str, str, str], delta: int) -> None:
        n = self._held.get(labels, 0) + delta
        if n > 0:
            self._held[labels] = n
        else:
            self._held.pop(labels, None)
        self.metrics.queued.labels(*labels).set(max(n, 0))
