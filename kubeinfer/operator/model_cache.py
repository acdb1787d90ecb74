"""Pure: the names, paths and volumes of a download-once model cache (spec.model.cache pvc or
storageClass + size; see cache_spec.py).

Layout inside the claim, keyed by model and revision so InferenceServices of the same model on the
same claim share one copy:

    /model-store/models/ORG--NAME/REVISION/          the model's files (as in the hub repo)
    /model-store/models/ORG--NAME/REVISION/.kubeinfer-complete   written last, after every file

The download Job (download_job.py) mounts the claim read-write; engine pods mount it read-only,
get the folder as their MODEL and HF_HUB_OFFLINE=1, and are created only once the Job succeeded.
"""
from __future__ import annotations

import hashlib
import re

from kubeinfer.operator.spec import InferenceServiceSpec

MOUNT = "/model-store"
VOLUME = "model-store"
COMPLETE_MARKER = ".kubeinfer-complete"   # the same name as kubeinfer/download.py's (no import: no engine)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def enabled(spec: InferenceServiceSpec) -> bool:
    return spec.model.cache is not None


def claim_name(spec: InferenceServiceSpec) -> str:
    """The PVC that holds the cache: the user's, or NAME-model-cache that the operator creates."""
    cache = spec.model.cache
    return cache.claim if cache and cache.claim else f"{spec.name}-model-cache"


def _safe(part: str) -> str:
    """A path segment of `part`; a short hash keeps two different revisions apart once escaped."""
    clean = _UNSAFE.sub("_", part)
    if clean == part and part not in (".", ".."):
        return part
    return f"{clean}-{hashlib.sha256(part.encode()).hexdigest()[:8]}"


def relative_dir(spec: InferenceServiceSpec) -> str:
    """models/ORG--NAME/REVISION: the model's folder inside the claim."""
    org, name = spec.model.uri[len("hf://"):].split("/", 1)
    return f"models/{org}--{name}/{_safe(spec.model.revision)}"


def model_dir(spec: InferenceServiceSpec) -> str:
    """Where pods (and the Job) see the model's folder."""
    return f"{MOUNT}/{relative_dir(spec)}"


def engine_volume(spec: InferenceServiceSpec) -> tuple[dict, dict]:
    """(pod volume, container mount) of the engine pods: the claim, read-only."""
    return ({"name": VOLUME, "persistentVolumeClaim": {"claimName": claim_name(spec), "readOnly": True}},
            {"name": VOLUME, "mountPath": MOUNT, "readOnly": True})


def persistent_volume_claim(spec: InferenceServiceSpec, labels: dict) -> dict | None:
    """The claim the operator creates (storageClass + size), None for the user's own claim."""
    cache = spec.model.cache
    if cache is None or not cache.creates_claim:
        return None
    pvc_spec: dict = {"accessModes": ["ReadWriteMany"], "volumeMode": "Filesystem",
                      "resources": {"requests": {"storage": cache.size}}}
    if cache.storage_class:
        pvc_spec["storageClassName"] = cache.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim_name(spec), "namespace": spec.namespace, "labels": dict(labels)},
            "spec": pvc_spec}
