"""`RouterMetrics`: the router's Prometheus metrics, in a registry of its own (one per app).

    kubeinfer_router_requests_total{model, code}            answered requests by status code
    kubeinfer_router_queued_requests{model, namespace, inferenceservice}
                                                            requests held for a ready replica now:
                                                            the autoscaler's scale-from-zero signal
    kubeinfer_router_in_flight_requests{model}              requests sent upstream, not yet ended
    kubeinfer_router_queue_wait_seconds{model}              time held before a replica was ready
    kubeinfer_router_upstream_latency_seconds{model}        send -> first byte of the answer
    kubeinfer_router_upstream_retries_total{model, reason}  retries on another replica
    kubeinfer_router_ejections_total{model}                 replicas skipped after repeated failures

Unknown model names are not labels (a client could make any number of series): they count under
model="" with their code.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kubeinfer_router_requests", "Requests answered, by model and status code",
                                ["model", "code"], registry=r)
        self.queued = Gauge("kubeinfer_router_queued_requests",
                            "Requests held waiting for a ready replica (scale from zero)",
                            ["model", "namespace", "inferenceservice"], registry=r)
        self.in_flight = Gauge("kubeinfer_router_in_flight_requests",
                               "Requests sent to a replica whose answer has not ended", ["model"], registry=r)
        self.queue_wait = Histogram("kubeinfer_router_queue_wait_seconds",
                                    "Seconds a request was held before a replica was ready", ["model"],
                                    buckets=_WAIT_BUCKETS, registry=r)
        self.upstream_latency = Histogram("kubeinfer_router_upstream_latency_seconds",
                                          "Seconds from sending a request to a replica to its first byte",
                                          ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.retries = Counter("kubeinfer_router_upstream_retries",
                               "Requests retried on another replica before their first byte",
                               ["model", "reason"], registry=r)
        self.ejections = Counter("kubeinfer_router_ejections",
                                 "Replicas skipped for a while after failing repeatedly", ["model"], registry=r)
