"""How requests reach an InferenceService and how many replicas serve them: spec.router,
spec.loadBalancing, spec.inferencePool and spec.autoscaling, parsed into frozen dataclasses.

    spec.router         kubeinfer (default): the kubeinfer router (kubeinfer/router) serves the
                        model, holds requests while no replica is ready and balances by
                        spec.loadBalancing; inference-pool: the operator also renders a Gateway API
                        Inference Extension InferencePool (render_pool.py) and the kubeinfer router
                        leaves the model alone; none: only the Service NAME:8000
    spec.loadBalancing  strategy least-load | prefix-hash (absent: the router's --load-balancing),
                        prefixHash.{prefixChars, prefixTokens, loadFactor} (absent: the router's)
    spec.autoscaling    minReplicas may be 0 (scale from zero), which needs spec.router kubeinfer:
                        only the router holds a request while no replica runs, and its held count
                        is what scales the model up (autoscale.py)

`read_traffic` reports every problem through `bad(field, value, allowed)`, as spec.py's reader does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROUTER_KUBEINFER, ROUTER_INFERENCE_POOL, ROUTER_NONE = "kubeinfer", "inference-pool", "none"
ROUTERS = (ROUTER_KUBEINFER, ROUTER_INFERENCE_POOL, ROUTER_NONE)
STRATEGIES = ("least-load", "prefix-hash")   # kubeinfer/router/config.py's, tested equal
AUTOSCALING_FIELDS = ("minReplicas", "maxReplicas", "targetRequests", "scaleDownDelaySeconds",
                      "intervalSeconds")
PREFIX_HASH_FIELDS = ("prefixChars", "prefixTokens", "loadFactor")
EPP_PORT = 9002   # the endpoint picker's gRPC (ext-proc) port in the Inference Extension's manifests

Bad = Callable[[str, Any, str], None]


@dataclass(frozen=True)
class Autoscaling:
    """spec.autoscaling: the operator sets spec.replicas from the in-flight requests (autoscale.py)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_requests: int = 8            # running + waiting requests per replica
    scale_down_delay_seconds: int = 300
    interval_seconds: int = 10

    @property
    def scales_to_zero(self) -> bool:
        return self.min_replicas == 0


@dataclass(frozen=True)
class LoadBalancing:
    """spec.loadBalancing; None / "" leave the router's own setting in force."""

    strategy: str = ""
    prefix_chars: int | None = None
    prefix_tokens: int | None = None
    load_factor: float | None = None


@dataclass(frozen=True)
class InferencePool:
    """spec.inferencePool: the endpoint picker Service the rendered InferencePool names."""

    endpoint_picker: str = ""           # "" -> NAME-epp
    endpoint_picker_port: int = EPP_PORT


@dataclass(frozen=True)
class Traffic:
    router: str = ROUTER_KUBEINFER
    load_balancing: LoadBalancing = field(default_factory=LoadBalancing)
    inference_pool: InferencePool = field(default_factory=InferencePool)
    autoscaling: Autoscaling | None = None


def _mapping(spec: dict, key: str, path: str, bad: Bad) -> dict:
    v = spec.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        bad(path, v, "must be a mapping")
        return {}
    return v


def _unknown(d: dict, allowed: tuple[str, ...], path: str, bad: Bad) -> None:
    for key in sorted(set(d) - set(allowed)):
        bad(f"{path}.{key}", d[key], f"allowed fields are {', '.join(allowed)}")


def _int(d: dict, key: str, path: str, bad: Bad, default: int | None, minimum: int,
         why: str = "") -> int | None:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        bad(f"{path}.{key}", v, f"must be an integer >= {minimum}{why}")
        return default
    return v


def _load_balancing(spec: dict, bad: Bad) -> LoadBalancing:
    path = "spec.loadBalancing"
    lb = _mapping(spec, "loadBalancing", path, bad)
    _unknown(lb, ("strategy", "prefixHash"), path, bad)
    strategy = lb.get("strategy") or ""
    if strategy and strategy not in STRATEGIES:
        bad(f"{path}.strategy", strategy, f"one of {', '.join(STRATEGIES)}")
        strategy = ""
    ph_path = f"{path}.prefixHash"
    ph = _mapping(lb, "prefixHash", ph_path, bad)
    _unknown(ph, PREFIX_HASH_FIELDS, ph_path, bad)
    if ph and strategy != "prefix-hash":
        bad(ph_path, None, "only applies with spec.loadBalancing.strategy: prefix-hash; set the "
                           "strategy or remove prefixHash")
    factor = ph.get("loadFactor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1):
        bad(f"{ph_path}.loadFactor", factor, "must be a number >= 1.0 (1.25 lets a replica take 25% "
                                             "more than the mean before its requests spill over)")
        factor = None
    return LoadBalancing(strategy=strategy,
                         prefix_chars=_int(ph, "prefixChars", ph_path, bad, None, 1),
                         prefix_tokens=_int(ph, "prefixTokens", ph_path, bad, None, 1),
                         load_factor=float(factor) if factor is not None else None)


def _inference_pool(spec: dict, router: str, bad: Bad) -> InferencePool:
    path = "spec.inferencePool"
    pool = _mapping(spec, "inferencePool", path, bad)
    if pool and router != ROUTER_INFERENCE_POOL:
        bad(path, None, "only applies with spec.router: inference-pool; set it or remove inferencePool")
    ref_path = f"{path}.endpointPickerRef"
    _unknown(pool, ("endpointPickerRef",), path, bad)
    ref = _mapping(pool, "endpointPickerRef", ref_path, bad)
    _unknown(ref, ("name", "port"), ref_path, bad)
    name = ref.get("name") or ""
    if not isinstance(name, str):
        bad(f"{ref_path}.name", name, "must name the endpoint picker's Service")
        name = ""
    port = _int(ref, "port", ref_path, bad, EPP_PORT, 1) or EPP_PORT
    if port > 65535:
        bad(f"{ref_path}.port", port, "must be a port number, 1 to 65535")
    return InferencePool(endpoint_picker=name, endpoint_picker_port=port)


def _autoscaling(spec: dict, router: str, bad: Bad) -> Autoscaling | None:
    if spec.get("autoscaling") is None:
        return None
    path = "spec.autoscaling"
    a = _mapping(spec, "autoscaling", path, bad)
    if not isinstance(spec.get("autoscaling"), dict):
        return None
    _unknown(a, AUTOSCALING_FIELDS, path, bad)
    low = _int(a, "minReplicas", path, bad, 1, 0, " (0: scale from zero through the kubeinfer router)")
    if low == 0 and router != ROUTER_KUBEINFER:
        bad(f"{path}.minReplicas", 0, f"scale from zero needs spec.router: kubeinfer (it is {router!r}): "
            "only the kubeinfer router holds requests while no replica runs; set minReplicas to 1 "
            "or spec.router to kubeinfer")
    if "maxReplicas" not in a:
        bad(f"{path}.maxReplicas", None, f"is required: an integer >= 1 and >= minReplicas ({low})")
        high = max(low, 1)
    else:
        high = _int(a, "maxReplicas", path, bad, max(low, 1), 1)
        if high < low:
            bad(f"{path}.maxReplicas", high, f"must be >= spec.autoscaling.minReplicas ({low})")
            high = max(low, 1)
    return Autoscaling(min_replicas=low, max_replicas=high,
                       target_requests=_int(a, "targetRequests", path, bad, 8, 1),
                       scale_down_delay_seconds=_int(a, "scaleDownDelaySeconds", path, bad, 300, 0),
                       interval_seconds=_int(a, "intervalSeconds", path, bad, 10, 1))


def read_traffic(spec: dict, bad: Bad) -> Traffic:
    router = spec.get("router") or ROUTER_KUBEINFER
    if router not in ROUTERS:
        bad("spec.router", router, f"one of {', '.join(ROUTERS)}")
        router = ROUTER_KUBEINFER
    return Traffic(router=router, load_balancing=_load_balancing(spec, bad),
                   inference_pool=_inference_pool(spec, router, bad),
                   autoscaling=_autoscaling(spec, router, bad))
