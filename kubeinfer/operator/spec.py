"""The InferenceService spec: parse the CR's dict into frozen dataclasses and enforce the rules the
CRD schema cannot say (cross-field rules, flags the operator owns, quantities).

`parse_spec` raises `InvalidSpec` carrying every `Problem` at once, each naming the field, the value
and what is allowed, so a user fixes the manifest in one pass. The schema in
crds/inferenceservice.yaml rejects what it can on `kubectl apply`; these rules repeat the important
ones because an older CRD may be installed, and `kubeinfer render` runs without a cluster.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from kubeinfer.operator.cache_spec import CacheSpec, read_cache
from kubeinfer.operator.problem import InvalidSpec, Problem
from kubeinfer.operator.quantity import is_quantity, parse_quantity
from kubeinfer.operator.traffic import Autoscaling, Traffic, read_traffic

GROUP, VERSION, KIND, PLURAL = "kubeinfer.io", "v1alpha1", "InferenceService", "inferenceservices"
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_MODEL_URI = "default"  # the engine's default model, SmolLM2, shipped in the image
# spec.parallelism.pipeline > 1 runs one pod per stage (multinode.py): a LeaderWorkerSet group, or
# a StatefulSet where LWS is not served. The switch stays so a build can turn the path off again.
PIPELINE_SUPPORTED = True
PIPELINE_UNSUPPORTED = ("pipeline parallelism is not supported by this operator build: set it to 1 "
                        "and use spec.parallelism.tensor (up to 16 GPUs of one node), or a smaller "
                        "or quantized model")
TENSOR_SIZES = (1, 2, 4, 8, 16)
GPU = "nvidia.com/gpu"
NO_ACCELERATOR = "none"
MAX_NAME = 63       # the Service is named after the resource: a DNS-1035 label
MAX_NAME_PIPELINE = 40  # pods are NAME-workers-G-R; leave room for the suffixes

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_HF = re.compile(r"^hf://([A-Za-z0-9][-A-Za-z0-9_.]*)/([A-Za-z0-9][-A-Za-z0-9_.]*)$")
_PVC = re.compile(r"^pvc://([a-z0-9]([-a-z0-9]*[a-z0-9])?)(/.*)?$")
_RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$")
URI_ALLOWED = ("hf://ORG/NAME, pvc://CLAIM/PATH, an absolute path inside the image, "
               f"or {DEFAULT_MODEL_URI!r} for the engine's default model")

# `kubeinfer serve` flags the operator sets itself -> the spec field a user sets instead.
OWNED_FLAGS = {
    "--model": "spec.model.uri",
    "--revision": "spec.model.revision",
    "--served-model-name": "spec.model.servedName",
    "--tensor-parallel-size": "spec.parallelism.tensor", "-tp": "spec.parallelism.tensor",
    "--pipeline-parallel-size": "spec.parallelism.pipeline", "-pp": "spec.parallelism.pipeline",
    "--device": "spec.accelerator",
    "--host": "nothing: the engine listens on 0.0.0.0 so the Service reaches it",
    "--port": "nothing: the port is 8000, the Service port",
    "--api-key": "spec.apiKeySecretRef",
    "--timeout-graceful-shutdown": "spec.terminationGracePeriodSeconds",
    "--nnodes": "spec.parallelism.pipeline", "--node-rank": "spec.parallelism.pipeline",
    "--master-addr": "spec.parallelism.pipeline", "--master-port": "spec.parallelism.pipeline",
    "--headless": "spec.parallelism.pipeline",
}
# Environment variables the operator sets itself -> the spec field a user sets instead.
OWNED_ENV = {
    "HF_TOKEN": "spec.model.credentialsSecretRef", "HF_HOME": "spec.model.cache",
    "KUBEINFER_API_KEY": "spec.apiKeySecretRef",
    "KUBEINFER_TERMINATION_LOG": "nothing: the engine's start-up error goes to /dev/termination-log",
    # pipeline > 1 (multinode.py); LWS_* are LeaderWorkerSet's own
    "KUBEINFER_NODE_SECRET": "nothing: the operator creates the Secret NAME-node-secret for it",
    "KUBEINFER_POD_IP": "spec.parallelism.pipeline", "KUBEINFER_NODE_RANK": "spec.parallelism.pipeline",
    "LWS_LEADER_ADDRESS": "spec.parallelism.pipeline", "LWS_WORKER_INDEX": "spec.parallelism.pipeline",
    "LWS_GROUP_SIZE": "spec.parallelism.pipeline",
}
PROBE_FIELDS = ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold")


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


@dataclass(frozen=True)
class ModelSpec:
    uri: str = DEFAULT_MODEL_URI
    served_name: str = ""
    revision: str = "main"
    credentials: SecretRef | None = None
    cache_claim: str = ""         # a PVC for HF_HOME; "" -> an emptyDir
    cache_size_limit: str = ""    # emptyDir sizeLimit; "" -> none
    cache: CacheSpec | None = None   # downloaded once by a Job into a shared claim (cache_spec.py)

    @property
    def scheme(self) -> str:
        if self.uri == DEFAULT_MODEL_URI:
            return "default"
        return self.uri.split("://", 1)[0] if "://" in self.uri else "path"


@dataclass(frozen=True)
class EngineSpec:
    image: str
    image_pull_policy: str = ""
    image_pull_secrets: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[dict, ...] = ()
    shm_size: str = ""            # "" -> 1Gi on CPU, 8Gi on GPUs


@dataclass(frozen=True)
class Scheduling:
    node_selector: dict = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    affinity: dict = field(default_factory=dict)
    priority_class_name: str = ""
    runtime_class_name: str = ""


@dataclass(frozen=True)
class InferenceServiceSpec:
    name: str
    namespace: str
    model: ModelSpec
    engine: EngineSpec
    accelerator: str = GPU
    tensor: int = 1
    pipeline: int = 1
    exclusive_topology: str = ""   # a node label key: each pipeline group alone in one such domain
    resources: dict = field(default_factory=dict)   # {} -> defaults from render
    replicas: int = 1
    scheduling: Scheduling = field(default_factory=Scheduling)
    api_key: SecretRef | None = None
    probes: dict = field(default_factory=dict)      # {"startup": {"failureThreshold": 180}, ...}
    termination_grace_period_seconds: int = 120
    traffic: Traffic = field(default_factory=Traffic)   # router, load balancing, autoscaling

    @property
    def autoscaling(self) -> Autoscaling | None:
        """None -> spec.replicas as the user sets it."""
        return self.traffic.autoscaling

    @property
    def uses_gpu(self) -> bool:
        return self.accelerator != NO_ACCELERATOR

    @property
    def served_name(self) -> str:
        return self.model.served_name or self.name


class _Reader:
    """Reads typed fields from nested dicts, collecting problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def bad(self, path: str, value: Any, allowed: str) -> None:
        self.problems.append(Problem(path, value, allowed))

    def obj(self, d: dict, key: str, path: str) -> dict:
        v = d.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.bad(path, v, "must be a mapping")
            return {}
        return v

    def list(self, d: dict, key: str, path: str) -> list:
        v = d.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            self.bad(path, v, "must be a list")
            return []
        return v

    def str(self, d: dict, key: str, path: str, default: str = "") -> str:
        v = d.get(key, default)
        if v is None:
            return default
        if not isinstance(v, str):
            self.bad(path, v, "must be a string")
            return default
        return v

    def int(self, d: dict, key: str, path: str, default: int, minimum: int) -> int:
        v = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            self.bad(path, v, f"must be an integer >= {minimum}")
            return default
        if v < minimum:
            self.bad(path, v, f"must be an integer >= {minimum}")
        return v

    def secret_ref(self, d: dict, key: str, path: str, default_key: str) -> SecretRef | None:
        ref = self.obj(d, key, path)
        if not ref:
            return None
        name = self.str(ref, "name", f"{path}.name")
        skey = self.str(ref, "key", f"{path}.key", default_key) or default_key
        if not _DNS1123.match(name):
            self.bad(f"{path}.name", name, "must name a Secret in the same namespace (a DNS-1123 name)")
        if not _SECRET_KEY.match(skey):
            self.bad(f"{path}.key", skey, "must be a Secret key: letters, digits, '-', '_' or '.'")
        return SecretRef(name, skey)


def _check_name(r: _Reader, name: str, pipeline: int) -> None:
    limit = MAX_NAME_PIPELINE if pipeline > 1 else MAX_NAME
    if not _DNS1035.match(name) or len(name) > limit:
        r.bad("metadata.name", name, f"must be a DNS-1035 label of at most {limit} characters "
              "(lower-case letters, digits and '-', starting with a letter): the Service is named after it")


def _check_uri(r: _Reader, uri: str) -> None:
    if uri == DEFAULT_MODEL_URI or _HF.match(uri) or _PVC.match(uri):
        return
    if uri.startswith("/") and "://" not in uri:
        return
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else None
    hint = f"unknown scheme {scheme!r}: " if scheme and scheme not in ("hf://", "pvc://") else ""
    r.bad("spec.model.uri", uri, f"{hint}use {URI_ALLOWED}")


def _check_resources(r: _Reader, resources: dict, accelerator: str, tensor: int) -> None:
    for part in ("limits", "requests"):
        values = r.obj(resources, part, f"spec.resources.{part}")
        for res, qty in values.items():
            path = f"spec.resources.{part}.{res}"
            if not is_quantity(qty):
                r.bad(path, qty, "must be a quantity such as 4, 500m or 32Gi")
                continue
            if "gpu" in res.split("/")[-1]:
                count = parse_quantity(qty)
                if accelerator == NO_ACCELERATOR and count != 0:
                    r.bad(path, qty, "spec.accelerator is 'none': remove the GPU request or set "
                          f"spec.accelerator to {GPU}")
                elif accelerator != NO_ACCELERATOR and res == accelerator and count != tensor:
                    r.bad(path, qty, f"GPUs per pod are spec.parallelism.tensor ({tensor}); "
                          "leave the GPU count out and the operator sets it")
    unknown = sorted(set(resources) - {"limits", "requests"})
    for key in unknown:
        r.bad(f"spec.resources.{key}", resources[key], "allowed fields are limits and requests")


def _check_args(r: _Reader, args: list) -> tuple[str, ...]:
    out = []
    for i, arg in enumerate(args):
        if not isinstance(arg, (str, int, float)) or isinstance(arg, bool):
            r.bad(f"spec.engine.args[{i}]", arg, "must be a string")
            continue
        arg = str(arg)
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            r.bad(f"spec.engine.args[{i}]", arg, f"the operator sets {flag}; use {OWNED_FLAGS[flag]}")
        out.append(arg)
    return tuple(out)


def _check_env(r: _Reader, env: list) -> tuple[dict, ...]:
    for i, var in enumerate(env):
        name = var.get("name") if isinstance(var, dict) else None
        if not isinstance(name, str) or not name:
            r.bad(f"spec.engine.env[{i}]", var, "must be an EnvVar with a name")
        elif name in OWNED_ENV:
            r.bad(f"spec.engine.env[{i}].name", name, f"the operator sets {name}; use {OWNED_ENV[name]}")
    return tuple(v for v in env if isinstance(v, dict))


def _read_probes(r: _Reader, probes: dict) -> dict:
    out: dict = {}
    for kind, values in probes.items():
        path = f"spec.probes.{kind}"
        if kind not in ("startup", "readiness", "liveness"):
            r.bad(path, kind, "probes are startup, readiness and liveness")
            continue
        values = r.obj(probes, kind, path)
        for key in values:
            if key not in PROBE_FIELDS:
                r.bad(f"{path}.{key}", values[key], f"overridable fields are {', '.join(PROBE_FIELDS)}")
        out[kind] = {k: r.int(values, k, f"{path}.{k}", 1, 0 if k == "initialDelaySeconds" else 1)
                     for k in PROBE_FIELDS if k in values}
    return out


def parse_spec(name: str, namespace: str, spec: dict, *, default_image: str,
               pipeline_supported: bool | None = None) -> InferenceServiceSpec:
    """The typed spec of one InferenceService; raises InvalidSpec listing every problem.
    `pipeline_supported` (default PIPELINE_SUPPORTED) lets the multi-pod rendering be tested."""
    r = _Reader()
    if not isinstance(spec, dict):
        raise InvalidSpec([Problem("spec", spec, "must be a mapping")])
    model = r.obj(spec, "model", "spec.model")
    uri = r.str(model, "uri", "spec.model.uri")
    if not uri:
        # no default: a typo such as spec.model.url or spec.modle must not deploy the demo model
        r.bad("spec.model.uri", None, f"is required: {URI_ALLOWED} (write it out)")
        uri = DEFAULT_MODEL_URI
    else:
        _check_uri(r, uri)
    served = r.str(model, "servedName", "spec.model.servedName")
    model_spec = ModelSpec(
        uri=uri, served_name=served, revision=r.str(model, "revision", "spec.model.revision", "main") or "main",
        credentials=r.secret_ref(model, "credentialsSecretRef", "spec.model.credentialsSecretRef", "token"))
    cache_claim, size_limit, cache = read_cache(r.obj(model, "cache", "spec.model.cache"),
                                                model_spec.scheme, r.bad)
    model_spec = replace(model_spec, cache_claim=cache_claim, cache_size_limit=size_limit, cache=cache)

    engine = r.obj(spec, "engine", "spec.engine")
    shm = r.str(engine, "shmSize", "spec.engine.shmSize")
    if shm and not is_quantity(shm):
        r.bad("spec.engine.shmSize", shm, "must be a quantity such as 8Gi")
    policy = r.str(engine, "imagePullPolicy", "spec.engine.imagePullPolicy")
    if policy and policy not in ("Always", "IfNotPresent", "Never"):
        r.bad("spec.engine.imagePullPolicy", policy, "one of Always, IfNotPresent, Never")
    pull_secrets = tuple(s.get("name", "") for s in r.list(engine, "imagePullSecrets", "spec.engine.imagePullSecrets")
                         if isinstance(s, dict))
    engine_spec = EngineSpec(
        image=r.str(engine, "image", "spec.engine.image") or default_image, image_pull_policy=policy,
        image_pull_secrets=pull_secrets, args=_check_args(r, r.list(engine, "args", "spec.engine.args")),
        env=_check_env(r, r.list(engine, "env", "spec.engine.env")), shm_size=shm)

    par = r.obj(spec, "parallelism", "spec.parallelism")
    tensor = r.int(par, "tensor", "spec.parallelism.tensor", 1, 1)
    pipeline = r.int(par, "pipeline", "spec.parallelism.pipeline", 1, 1)
    if pipeline_supported is None:
        pipeline_supported = PIPELINE_SUPPORTED
    if pipeline > 1 and not pipeline_supported:
        r.bad("spec.parallelism.pipeline", pipeline, PIPELINE_UNSUPPORTED)
    if tensor >= 1 and tensor not in TENSOR_SIZES:
        r.bad("spec.parallelism.tensor", tensor, f"one of {', '.join(map(str, TENSOR_SIZES))}: the "
              "GPUs of one pod, which must divide the model's attention heads")
    accelerator = r.str(spec, "accelerator", "spec.accelerator", GPU) or GPU
    if accelerator != NO_ACCELERATOR and not _RESOURCE_NAME.match(accelerator):
        r.bad("spec.accelerator", accelerator, f"{GPU} (or another extended resource), or 'none' for CPU")
    # pipeline stages on CPU talk over gloo (the e2e runs them); tensor parallelism wants GPUs
    if accelerator == NO_ACCELERATOR and tensor > 1:
        r.bad("spec.parallelism.tensor", tensor, "must be 1 when spec.accelerator is 'none'")
    exclusive = r.str(par, "exclusiveTopology", "spec.parallelism.exclusiveTopology")
    if exclusive and not _RESOURCE_NAME.match(exclusive):
        r.bad("spec.parallelism.exclusiveTopology", exclusive,
              "a node label key such as topology.kubernetes.io/zone")
    elif exclusive and pipeline == 1:
        r.bad("spec.parallelism.exclusiveTopology", exclusive,
              "only applies to pipeline groups: set spec.parallelism.pipeline > 1, or remove it")
    resources = r.obj(spec, "resources", "spec.resources")
    _check_resources(r, resources, accelerator, tensor)

    sched = r.obj(spec, "scheduling", "spec.scheduling")
    scheduling = Scheduling(
        node_selector=r.obj(sched, "nodeSelector", "spec.scheduling.nodeSelector"),
        tolerations=tuple(r.list(sched, "tolerations", "spec.scheduling.tolerations")),
        affinity=r.obj(sched, "affinity", "spec.scheduling.affinity"),
        priority_class_name=r.str(sched, "priorityClassName", "spec.scheduling.priorityClassName"),
        runtime_class_name=r.str(sched, "runtimeClassName", "spec.scheduling.runtimeClassName"))
    for key, value in scheduling.node_selector.items():
        if not isinstance(value, str):
            r.bad(f"spec.scheduling.nodeSelector.{key}", value, "label values are strings: quote it")

    _check_name(r, name, pipeline)
    result = InferenceServiceSpec(
        name=name, namespace=namespace, model=model_spec, engine=engine_spec, accelerator=accelerator,
        tensor=tensor, pipeline=pipeline, exclusive_topology=exclusive, resources=resources,
        replicas=r.int(spec, "replicas", "spec.replicas", 1, 0), scheduling=scheduling,
        api_key=r.secret_ref(spec, "apiKeySecretRef", "spec.apiKeySecretRef", "api-key"),
        probes=_read_probes(r, r.obj(spec, "probes", "spec.probes")),
        termination_grace_period_seconds=r.int(spec, "terminationGracePeriodSeconds",
                                               "spec.terminationGracePeriodSeconds", 120, 0),
        traffic=read_traffic(spec, r.bad))
    if r.problems:
        raise InvalidSpec(r.problems)
    return result
