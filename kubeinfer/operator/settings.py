"""Operator settings: the one place the operator reads its environment.

Each setting has a flag on `kubeinfer operator` that wins over the environment variable, which the
Helm chart sets from its values.

    KUBEINFER_ENGINE_IMAGE      engine image when spec.engine.image is empty
    KUBEINFER_WATCH_NAMESPACES  comma-separated namespaces to watch; empty -> all namespaces
    KUBEINFER_RESYNC_SECONDS    how often each InferenceService is reconciled even when nothing
                                changed: drift correction, and a status refresh as a backstop
                                (pod events refresh the status at once) (default 10)
    KUBEINFER_CLUSTER_DOMAIN    appended to in-cluster host names (NAME.NS.svc.DOMAIN); default none
    KUBEINFER_LEADERWORKERSET   auto | on | off: use LeaderWorkerSet for pipeline > 1 (auto: when
                                the API serves leaderworkerset.x-k8s.io/v1)
    KUBEINFER_LIVENESS_PORT     port of the operator's own /healthz (0 -> none; default 8080)
    KUBEINFER_METRICS_PORT      port of the operator's Prometheus /metrics (0 -> none; default 8081)
    KUBEINFER_LEADER_ELECTION_NAMESPACE
                                namespace of the Lease kubeinfer-operator that the replicas elect a
                                leader with; empty -> no election (run one replica). The chart sets
                                it to the release namespace.
    KUBEINFER_SCRAPE_VIA        how spec.autoscaling reads engine /metrics: pod-ip (GET POD_IP:8000,
                                the default) or apiserver (GET pods/NAME:8000/proxy/metrics, for
                                clusters whose NetworkPolicies keep the operator from pod IPs)
    KUBEINFER_ROUTER_URL        the kubeinfer router, e.g. http://kubeinfer-router.kubeinfer.svc:8080:
                                spec.autoscaling adds the requests it holds (GET /queue) to the
                                load, which scales minReplicas 0 up from zero. Empty: not read. The
                                chart sets it when router.enabled.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kubeinfer import __version__

DEFAULT_ENGINE_IMAGE = f"ghcr.io/kubeinfer/kubeinfer:{__version__}"
LWS_MODES = ("auto", "on", "off")
SCRAPE_MODES = ("pod-ip", "apiserver")


@dataclass(frozen=True)
class OperatorSettings:
    engine_image: str = DEFAULT_ENGINE_IMAGE
    namespaces: tuple[str, ...] = ()   # () -> all namespaces
    resync_seconds: float = 10.0
    cluster_domain: str = ""
    leaderworkerset: str = "auto"
    liveness_port: int = 8080
    metrics_port: int = 8081
    leader_election_namespace: str = ""   # "" -> no leader election
    scrape_via: str = "pod-ip"
    router_url: str = ""                  # "" -> held requests are not read (no scale from zero)

    def __post_init__(self) -> None:
        if self.resync_seconds <= 0:
            raise ValueError(f"resync seconds must be positive, got {self.resync_seconds}")
        if self.leaderworkerset not in LWS_MODES:
            raise ValueError(f"leaderworkerset must be one of {', '.join(LWS_MODES)}, "
                             f"got {self.leaderworkerset!r}")
        for what, port in (("liveness", self.liveness_port), ("metrics", self.metrics_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{what} port must be in 0..65535, got {port}")
        if self.metrics_port and self.metrics_port == self.liveness_port:
            raise ValueError(f"the metrics port and the liveness port are both {self.metrics_port}; "
                             "give them different ports (or 0 to turn one off)")
        if self.scrape_via not in SCRAPE_MODES:
            raise ValueError(f"scrape via must be one of {', '.join(SCRAPE_MODES)}, got {self.scrape_via!r}")
        if self.router_url and not self.router_url.startswith(("http://", "https://")):
            raise ValueError(f"router URL must start with http:// or https://, got {self.router_url!r} "
                             "(e.g. http://kubeinfer-router.kubeinfer.svc:8080)")

    @property
    def all_namespaces(self) -> bool:
        return not self.namespaces

    def service_host(self, name: str, namespace: str) -> str:
        """The in-cluster DNS name of a Service."""
        host = f"{name}.{namespace}.svc"
        return f"{host}.{self.cluster_domain}" if self.cluster_domain else host

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        try:
            return cls(
                engine_image=env.get("KUBEINFER_ENGINE_IMAGE") or DEFAULT_ENGINE_IMAGE,
                namespaces=tuple(n.strip() for n in env.get("KUBEINFER_WATCH_NAMESPACES", "").split(",")
                                 if n.strip()),
                resync_seconds=float(env.get("KUBEINFER_RESYNC_SECONDS") or 10),
                cluster_domain=(env.get("KUBEINFER_CLUSTER_DOMAIN") or "").strip("."),
                leaderworkerset=(env.get("KUBEINFER_LEADERWORKERSET") or "auto").lower(),
                liveness_port=int(env.get("KUBEINFER_LIVENESS_PORT") or 8080),
                metrics_port=int(env.get("KUBEINFER_METRICS_PORT") or 8081),
                leader_election_namespace=(env.get("KUBEINFER_LEADER_ELECTION_NAMESPACE") or "").strip(),
                scrape_via=(env.get("KUBEINFER_SCRAPE_VIA") or "pod-ip").lower(),
                router_url=(env.get("KUBEINFER_ROUTER_URL") or "").strip().rstrip("/"),
            )
        except ValueError as e:
            raise ValueError(f"invalid operator setting in the environment: {e}") from None
