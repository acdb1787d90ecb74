"""Pure: the Job that downloads an hf:// model once into the cache claim (spec.model.cache).

It runs the engine image's `kubeinfer download hf://ORG/NAME --revision REV --dir DIR`
(kubeinfer/download.py: huggingface_hub's snapshot_download into DIR, then the completion marker;
an existing marker makes it a no-op), with HF_TOKEN from spec.model.credentialsSecretRef, on the
pods' nodeSelector/tolerations/affinity (a node that can mount the claim) but without GPUs. Its
name carries a hash of its spec: a Job's template cannot change, so a changed spec is a new Job
(the old one is deleted as an orphan) and the same spec is the same Job.
"""
from __future__ import annotations

import copy
import hashlib
import json

from kubeinfer.operator import model_cache, podspec
from kubeinfer.operator.spec import InferenceServiceSpec

BACKOFF_LIMIT = 3                 # pod retries before the Job fails (network hiccups, a killed node)
ACTIVE_DEADLINE_SECONDS = 6 * 3600   # a hung download fails instead of holding the pods forever
TERMINATION_LOG = podspec.TERMINATION_LOG
LABEL_CACHE_OF = "kubeinfer.io/model-cache-of"   # the download pod's owner; not the engine selector
RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}


def _container(spec: InferenceServiceSpec) -> dict:
    # the hub client's own state (token cache, xet chunk cache) in a scratch emptyDir, not in a home
    # directory that may not be writable, nor on the shared claim
    env = [{"name": "KUBEINFER_TERMINATION_LOG", "value": TERMINATION_LOG},
           {"name": "HF_HOME", "value": podspec.HF_HOME}]
    if spec.model.credentials is not None:
        ref = spec.model.credentials
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    c = {
        "name": "download",
        "image": spec.engine.image,
        "command": ["kubeinfer"],
        "args": ["download", spec.model.uri, "--revision", spec.model.revision,
                 "--dir", model_cache.model_dir(spec)],
        "env": env,
        "resources": copy.deepcopy(RESOURCES),
        "volumeMounts": [{"name": model_cache.VOLUME, "mountPath": model_cache.MOUNT},
                         {"name": "hf-home", "mountPath": podspec.CACHE_DIR}],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    if spec.engine.image_pull_policy:
        c["imagePullPolicy"] = spec.engine.image_pull_policy
    return c


def _pod_spec(spec: InferenceServiceSpec) -> dict:
    s = spec.scheduling
    pod = {
        "restartPolicy": "Never",                 # the Job makes a new pod; backoffLimit counts them
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": podspec.RUN_AS, "runAsGroup": podspec.RUN_AS,
                            "fsGroup": podspec.RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container(spec)],
        "volumes": [{"name": model_cache.VOLUME,
                     "persistentVolumeClaim": {"claimName": model_cache.claim_name(spec)}},
                    {"name": "hf-home", "emptyDir": {}}],
    }
    # the same nodes as the engine pods (the claim's topology, the pull secrets), but no GPU:
    # the toleration lets it run on a GPU node without asking for a GPU
    optional = {"nodeSelector": dict(s.node_selector), "tolerations": podspec.tolerations(spec),
                "affinity": copy.deepcopy(s.affinity), "priorityClassName": s.priority_class_name,
                "imagePullSecrets": [{"name": n} for n in spec.engine.image_pull_secrets]}
    pod.update({k: v for k, v in optional.items() if v})
    return pod


def job_name(spec: InferenceServiceSpec, job_spec: dict) -> str:
    digest = hashlib.sha256(json.dumps(job_spec, sort_keys=True, separators=(",", ":")).encode())
    # Job names are label values too (job-name): at most 63 characters
    return f"{spec.name[:44].rstrip('-')}-download-{digest.hexdigest()[:8]}"


def download_job(spec: InferenceServiceSpec, labels: dict) -> dict:
    """The Job; `labels` go on the Job (the operator's child labels), not on its pod, so the
    download pod is never taken for an engine pod by the Service, PDB or status selectors."""
    pod_labels = {k: v for k, v in labels.items() if k != "kubeinfer.io/inferenceservice"}
    pod_labels["app.kubernetes.io/component"] = "model-download"
    pod_labels[LABEL_CACHE_OF] = spec.name
    job_spec = {
        "backoffLimit": BACKOFF_LIMIT,
        "activeDeadlineSeconds": ACTIVE_DEADLINE_SECONDS,
        "template": {"metadata": {"labels": pod_labels}, "spec": _pod_spec(spec)},
    }
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": job_name(spec, job_spec), "namespace": spec.namespace,
                         "labels": {**labels, "app.kubernetes.io/component": "model-download"}},
            "spec": job_spec}
