"""spec.model.cache: where a model's files live, read and checked into a `CacheSpec`.

Two kinds of cache, never both:

    HF_HOME of each pod      claimName (a PVC) or sizeLimit (an emptyDir): the engine downloads at start
    downloaded once          pvc: CLAIM (an existing ReadWriteMany claim), or storageClass + size (the
                             operator creates the claim NAME-model-cache, ReadWriteMany); a download Job
                             fills it, the engine pods mount it read-only and start without network

A claim the operator creates belongs to the InferenceService (deleted with it) unless
reclaimPolicy is Retain: then it stays, and an InferenceService of the same name finds it again.
Only hf:// models are downloaded: pvc://, paths in the image and "default" are local already.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kubeinfer.operator.quantity import is_quantity, parse_quantity

RECLAIM_POLICIES = ("Delete", "Retain")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_FIELDS = ("claimName", "sizeLimit", "pvc", "storageClass", "size", "reclaimPolicy")
CACHE_HOW = ("set spec.model.cache.pvc to an existing ReadWriteMany claim, or storageClass and size "
             "for a claim the operator creates")


@dataclass(frozen=True)
class CacheSpec:
    """A download-once cache. `claim`: an existing PVC; else the operator creates one of `size`
    (storage class `storage_class`, "" for the cluster's default)."""

    claim: str = ""
    storage_class: str = ""
    size: str = ""
    retain: bool = False

    @property
    def creates_claim(self) -> bool:
        return not self.claim


def read_cache(cache: dict, scheme: str, bad: Callable[[str, object, str], None]
               ) -> tuple[str, str, CacheSpec | None]:
    """(HF_HOME claim, HF_HOME emptyDir sizeLimit, the download cache or None) of spec.model.cache;
    `scheme` is the model uri's (hf, pvc, path, default); problems go to `bad(path, value, allowed)`."""
    p = "spec.model.cache"
    values = {k: cache.get(k) for k in _FIELDS}
    for key, value in values.items():
        if value is not None and key != "size" and key != "sizeLimit" and not isinstance(value, str):
            bad(f"{p}.{key}", value, "must be a string")
            values[key] = None
    hf_home_claim = values["claimName"] or ""
    size_limit = str(values["sizeLimit"]) if values["sizeLimit"] not in (None, "") else ""
    if hf_home_claim and not _DNS1123.match(hf_home_claim):
        bad(f"{p}.claimName", hf_home_claim, "must name a PersistentVolumeClaim")
    if size_limit and not is_quantity(size_limit):
        bad(f"{p}.sizeLimit", size_limit, "must be a quantity such as 100Gi")
    claim, storage_class = values["pvc"] or "", values["storageClass"] or ""
    size = str(values["size"]) if values["size"] not in (None, "") else ""
    policy = values["reclaimPolicy"] or ""
    if not (claim or storage_class or size or policy):
        return hf_home_claim, size_limit, None

    if hf_home_claim or size_limit:
        bad(p, {k: v for k, v in values.items() if v not in (None, "")},
            "claimName/sizeLimit (each pod downloads into its own HF_HOME) and pvc/storageClass/size "
            "(downloaded once by a Job) are two different caches: keep one of them")
    if scheme != "hf":
        what = {"pvc": "a pvc:// model is read from its claim already",
                "path": "a path inside the image is there already",
                "default": "the default model ships in the image"}.get(scheme, "only hf:// models are downloaded")
        bad(p, {k: v for k, v in values.items() if v not in (None, "")},
            f"{what}: remove spec.model.cache (it downloads hf://ORG/NAME models once per cluster)")
    if claim:
        if not _DNS1123.match(claim):
            bad(f"{p}.pvc", claim, "must name an existing PersistentVolumeClaim in the same namespace")
        for key, value in (("storageClass", storage_class), ("size", size), ("reclaimPolicy", policy)):
            if value:
                bad(f"{p}.{key}", value, "pvc names an existing claim; storageClass, size and "
                    "reclaimPolicy are for a claim the operator creates: remove one or the other")
        return hf_home_claim, size_limit, CacheSpec(claim=claim)

    if not size:
        bad(f"{p}.size", None, f"is required with storageClass: the claim's size, e.g. 100Gi, larger "
            f"than the model's files ({CACHE_HOW})")
    elif not is_quantity(size) or parse_quantity(size) <= 0:
        bad(f"{p}.size", size, "must be a positive quantity such as 100Gi")
    if storage_class and not _DNS1123.match(storage_class):
        bad(f"{p}.storageClass", storage_class, "must name a StorageClass that provides ReadWriteMany volumes")
    if policy and policy not in RECLAIM_POLICIES:
        bad(f"{p}.reclaimPolicy", policy, "Delete (the claim goes with the InferenceService, the "
            "default) or Retain (it stays)")
    return hf_home_claim, size_limit, CacheSpec(storage_class=storage_class, size=size,
                                                retain=policy == "Retain")
