"""Pure: the engine pod template of an InferenceService (container, probes, volumes, resources).

The contract with the engine image: `kubeinfer serve [MODEL] --host 0.0.0.0 --port 8000 ...` serves
/health (200 once the model is loaded), /metrics and the OpenAI API on port 8000, writes its fatal
start-up error to $KUBEINFER_TERMINATION_LOG (the termination message file, marked by its first
line; for other exits terminationMessagePolicy FallbackToLogsOnError gives the log's tail) and drains
running requests on SIGTERM for --timeout-graceful-shutdown seconds.
"""
from __future__ import annotations

import copy

from kubeinfer.operator import model_cache
from kubeinfer.operator.spec import InferenceServiceSpec

PORT = 8000
TERMINATION_LOG = "/dev/termination-log"
DIST_PORT = 29500               # torch.distributed rendezvous of multi-pod (pipeline) groups
CACHE_DIR = "/var/cache/kubeinfer"
HF_HOME = f"{CACHE_DIR}/huggingface"
MODELS_DIR = "/models"
RUN_AS = 1000                   # the image's `kubeinfer` user
PRESTOP_SECONDS = 10            # endpoints drop the pod from the Service before SIGTERM arrives
DEFAULT_PROBES = {
    # 180 x 10 s = 30 minutes to download and load weights before the kubelet gives up
    "startup": {"periodSeconds": 10, "failureThreshold": 180, "timeoutSeconds": 5},
    "readiness": {"periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 5},
    "liveness": {"periodSeconds": 20, "failureThreshold": 3, "timeoutSeconds": 10},
}
PROMETHEUS_ANNOTATIONS = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                          "prometheus.io/path": "/metrics"}


def model_argument(spec: InferenceServiceSpec) -> str | None:
    """The MODEL positional of `kubeinfer serve`; None runs the engine's default model."""
    uri, scheme = spec.model.uri, spec.model.scheme
    if scheme == "default":
        return None
    if model_cache.enabled(spec):
        return model_cache.model_dir(spec)   # downloaded by the Job, mounted read-only
    if scheme == "hf":
        return uri[len("hf://"):]
    if scheme == "pvc":
        claim, _, path = uri[len("pvc://"):].partition("/")
        return f"{MODELS_DIR}/{claim}/{path}".rstrip("/")
    return uri


def probes(spec: InferenceServiceSpec) -> dict[str, dict]:
    """startupProbe/readinessProbe/livenessProbe on /health, spec.probes overriding the defaults."""
    out = {}
    for kind, defaults in DEFAULT_PROBES.items():
        probe = {"httpGet": {"path": "/health", "port": "http"}, **defaults,
                 **spec.probes.get(kind, {})}
        out[f"{kind}Probe"] = probe
    return out


def startup_budget_seconds(spec: InferenceServiceSpec) -> int:
    p = probes(spec)["startupProbe"]
    return int(p.get("initialDelaySeconds", 0) + p["periodSeconds"] * p["failureThreshold"])


def shutdown_seconds(spec: InferenceServiceSpec) -> tuple[int, int]:
    """(preStop sleep, engine drain time) within terminationGracePeriodSeconds, 5 s to spare."""
    grace = spec.termination_grace_period_seconds
    pre_stop = min(PRESTOP_SECONDS, grace // 4)
    return pre_stop, max(0, grace - pre_stop - 5)


def resources(spec: InferenceServiceSpec) -> dict:
    """spec.resources as given (the operator fills in the GPU count), else sized defaults."""
    if spec.resources:
        out = {k: dict(copy.deepcopy(spec.resources[k])) for k in ("limits", "requests")
               if spec.resources.get(k)}
    elif spec.uses_gpu:
        t = spec.tensor
        out = {"requests": {"cpu": str(4 * t), "memory": f"{32 * t}Gi"},
               "limits": {"memory": f"{32 * t}Gi"}}
    else:
        out = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    if spec.uses_gpu:
        # extended resources need the limit; the request must equal it
        out.setdefault("limits", {})[spec.accelerator] = spec.tensor
        out.setdefault("requests", {})[spec.accelerator] = spec.tensor
    return out


def engine_args(spec: InferenceServiceSpec) -> list[str]:
    args = ["serve"]
    model = model_argument(spec)
    if model is not None:
        args.append(model)
    args += ["--host", "0.0.0.0", "--port", str(PORT), "--served-model-name", spec.served_name,
             "--tensor-parallel-size", str(spec.tensor), "--pipeline-parallel-size", str(spec.pipeline),
             "--timeout-graceful-shutdown", str(shutdown_seconds(spec)[1])]
    if spec.model.scheme == "hf" and not model_cache.enabled(spec):
        args += ["--revision", spec.model.revision]
    args += ["--device", "cuda" if spec.uses_gpu else "cpu"]
    return args + list(spec.engine.args)


def _secret_env(name: str, ref) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def engine_env(spec: InferenceServiceSpec, extra_env: list[dict]) -> list[dict]:
    env = [{"name": "HF_HOME", "value": HF_HOME},
           {"name": "KUBEINFER_TERMINATION_LOG", "value": TERMINATION_LOG}]
    if model_cache.enabled(spec):
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})   # the files are on the volume
    elif spec.model.credentials is not None:
        env.append(_secret_env("HF_TOKEN", spec.model.credentials))
    if spec.api_key is not None:
        env.append(_secret_env("KUBEINFER_API_KEY", spec.api_key))
    return env + extra_env + [copy.deepcopy(v) for v in spec.engine.env]


def volumes(spec: InferenceServiceSpec) -> tuple[list[dict], list[dict]]:
    """(pod volumes, container volumeMounts)."""
    shm = spec.engine.shm_size or ("8Gi" if spec.uses_gpu else "1Gi")
    # PyTorch shares tensors between processes through /dev/shm; the container runtime's 64 MiB
    # default breaks tensor parallelism (the `docker run --ipc=host` advice, done the Kubernetes way).
    vols = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if spec.model.cache_claim:
        vols.append({"name": "model-cache",
                     "persistentVolumeClaim": {"claimName": spec.model.cache_claim}})
    else:
        empty = {"sizeLimit": spec.model.cache_size_limit} if spec.model.cache_size_limit else {}
        vols.append({"name": "model-cache", "emptyDir": empty})
    mounts.append({"name": "model-cache", "mountPath": CACHE_DIR})
    if model_cache.enabled(spec):
        vol, mount = model_cache.engine_volume(spec)
        vols.append(vol)
        mounts.append(mount)
    if spec.model.scheme == "pvc":
        claim = spec.model.uri[len("pvc://"):].partition("/")[0]
        vols.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"{MODELS_DIR}/{claim}", "readOnly": True})
    return vols, mounts


def container(spec: InferenceServiceSpec, extra_env: list[dict]) -> dict:
    _, mounts = volumes(spec)
    pre_stop, _ = shutdown_seconds(spec)
    c = {
        "name": "engine",
        "image": spec.engine.image,
        "command": ["kubeinfer"],
        "args": engine_args(spec),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": engine_env(spec, extra_env),
        "resources": resources(spec),
        "volumeMounts": mounts,
        **probes(spec),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    if spec.pipeline > 1:
        c["ports"].append({"name": "dist", "containerPort": DIST_PORT, "protocol": "TCP"})
    if pre_stop:
        c["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(pre_stop)]}}}
    if spec.engine.image_pull_policy:
        c["imagePullPolicy"] = spec.engine.image_pull_policy
    return c


def tolerations(spec: InferenceServiceSpec) -> list[dict]:
    tols = [copy.deepcopy(t) for t in spec.scheduling.tolerations]
    if spec.uses_gpu and not any(t.get("key") == spec.accelerator for t in tols):
        # GPU node pools are commonly tainted so that only GPU workloads land there
        tols.append({"key": spec.accelerator, "operator": "Exists", "effect": "NoSchedule"})
    return tols


def pod_template(spec: InferenceServiceSpec, labels: dict, extra_env: list[dict] | None = None) -> dict:
    """The pod template; `labels` gets no hash here, render adds kubeinfer.io/template-hash."""
    vols, _ = volumes(spec)
    pod = {
        "automountServiceAccountToken": False,    # the engine never calls the Kubernetes API
        "enableServiceLinks": False,              # no FOO_SERVICE_HOST variables in the engine's env
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container(spec, extra_env or [])],
        "volumes": vols,
    }
    s = spec.scheduling
    tols = tolerations(spec)
    optional = {"nodeSelector": dict(s.node_selector), "tolerations": tols,
                "affinity": copy.deepcopy(s.affinity), "priorityClassName": s.priority_class_name,
                "runtimeClassName": s.runtime_class_name,
                "imagePullSecrets": [{"name": n} for n in spec.engine.image_pull_secrets]}
    pod.update({k: v for k, v in optional.items() if v})
    return {"metadata": {"labels": dict(labels), "annotations": dict(PROMETHEUS_ANNOTATIONS)},
            "spec": pod}

