"""The operator's own Prometheus metrics, served on --metrics-port (default 8081, 0: off).

    kubeinfer_operator_reconciles_total{trigger, result}        trigger: change | resync | restore |
                                                                 refresh; result: ok | partial |
                                                                 invalid | error
    kubeinfer_operator_reconcile_duration_seconds{trigger}      histogram of the same
    kubeinfer_operator_api_errors_total{code}                   failed Kubernetes API calls of the
                                                                 operator's own (0: no answer)
    kubeinfer_operator_inferenceservices{phase}                 InferenceServices per status.phase
    kubeinfer_operator_leader                                   1 while this replica holds the lease

A registry of its own, so that tests and an embedding process see only these.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASES = ("Pending", "Downloading", "Loading", "Ready", "Degraded", "Failed")
REGISTRY = CollectorRegistry(auto_describe=True)
RECONCILES = Counter("kubeinfer_operator_reconciles_total", "Reconciles and status refreshes by outcome",
                     ["trigger", "result"], registry=REGISTRY)
DURATION = Histogram("kubeinfer_operator_reconcile_duration_seconds", "Time of one reconcile or refresh",
                     ["trigger"], registry=REGISTRY,
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
API_ERRORS = Counter("kubeinfer_operator_api_errors_total", "Failed Kubernetes API calls by HTTP status "
                     "(0: no answer)", ["code"], registry=REGISTRY)
PHASE_COUNT = Gauge("kubeinfer_operator_inferenceservices", "InferenceServices by status.phase",
                    ["phase"], registry=REGISTRY)
LEADER = Gauge("kubeinfer_operator_leader", "1 while this replica holds the leader lease", registry=REGISTRY)


class Timed:
    """What `reconciling` yields: the handler sets `result` before the block ends."""

    def __init__(self) -> None:
        self.result = "ok"


@contextmanager
def reconciling(trigger: str) -> Iterator[Timed]:
    """Count and time one reconcile; an exception escaping the block counts as `error`."""
    timed, start = Timed(), time.perf_counter()
    try:
        yield timed
    except BaseException:
        timed.result = "error"
        raise
    finally:
        DURATION.labels(trigger).observe(time.perf_counter() - start)
        RECONCILES.labels(trigger, timed.result).inc()


class PhaseTracker:
    """The phase of every InferenceService this operator has seen, summed into PHASE_COUNT."""

    def __init__(self, gauge: Gauge = PHASE_COUNT) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}
        self._gauge = gauge

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        """Record the phase (None: the object is gone)."""
        with self._lock:
            if phase:
                self._phases[(namespace, name)] = phase
            else:
                self._phases.pop((namespace, name), None)
            counts = {p: 0 for p in PHASES}
            for p in self._phases.values():
                counts[p] = counts.get(p, 0) + 1
            for p, n in counts.items():
                self._gauge.labels(p).set(n)


def serve(port: int, addr: str = "0.0.0.0") -> bool:
    """Start the /metrics HTTP server in a daemon thread (port 0: do nothing). A port in use is
    logged, not fatal: the operator's work matters more than its metrics."""
    if not port:
        return False
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as e:
        logging.getLogger(__name__).error(f"operator metrics not served: cannot listen on {addr}:{port} ({e}); "
                                          "set --metrics-port (KUBEINFER_METRICS_PORT) to a free port, or 0")
        return False
    return True
