"""Pure: desired children vs observed children -> the actions that make them equal.

    missing                          -> create
    spec-hash annotation differs     -> update   (the InferenceService changed)
    same hash, desired not a subset  -> update   (edited by hand: drift, put back)
    immutable field differs          -> recreate (delete, then create)
    observed, ours, not desired      -> delete   (e.g. Deployment -> StatefulSet on pipeline > 1)
    being deleted                    -> nothing now; created again once it is gone

"Subset" means every field we render is present with an equal value in what the server returns; the
server adds defaults (fields we never set), drops empty values and rewrites quantities ("0.5" ->
"500m"), and none of that counts as drift.
"""
from __future__ import annotations

from dataclasses import dataclass

from kubeinfer.operator.quantity import same_quantity
from kubeinfer.operator.render import ANNOTATION_SPEC_HASH

# fields the API server refuses to change in place
IMMUTABLE = {
    "Deployment": (("spec", "selector"),),
    "StatefulSet": (("spec", "selector"), ("spec", "serviceName"), ("spec", "podManagementPolicy")),
    "Service": (("spec", "clusterIP"),),
    # LWS's webhook: a group's size (spec.parallelism.pipeline) is fixed once created
    "LeaderWorkerSet": (("spec", "leaderWorkerTemplate", "size"),),
}


@dataclass(frozen=True)
class Action:
    verb: str                   # create | update | recreate | delete
    obj: dict                   # desired; for delete, the observed object
    current: dict | None = None  # observed, for update
    reason: str = ""            # missing | changed | drifted | immutable | orphan

    def __str__(self) -> str:
        return f"{self.verb} {self.obj['kind']}/{self.obj['metadata']['name']} ({self.reason})"


def key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def is_controlled_by(obj: dict, owner_uid: str | None) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return owner_uid is not None and any(r.get("uid") == owner_uid and r.get("controller")
                                         for r in refs)


def _is_zero(value: object) -> bool:
    return value is None or value is False or value == 0 or value in ("", {}, [])


def _same_scalar(a: object, b: object) -> bool:
    if a == b and type(a) is type(b):
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (str, int, float)) and isinstance(b, (str, int, float)) and str(a) == str(b):
        return True
    return same_quantity(a, b)


def is_subset(desired: object, observed: object) -> bool:
    """Every value in `desired` is in `observed`; lists match item by item."""
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return _is_zero(desired) and _is_zero(observed)
        return all(is_subset(v, observed[k]) if k in observed else _is_zero(v)
                   for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(observed, list):
            return not desired and _is_zero(observed)
        return len(desired) == len(observed) and all(map(is_subset, desired, observed))
    if observed is None:
        return _is_zero(desired)
    return _same_scalar(desired, observed)


def _get(obj: dict, path: tuple[str, ...]) -> object:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _immutable_changed(desired: dict, observed: dict) -> bool:
    for path in IMMUTABLE.get(desired["kind"], ()):
        want = _get(desired, path)
        have = _get(observed, path)
        if want is not None and not (is_subset(want, have) and is_subset(have, want)):
            return True
    return False


def _spec_hash(obj: dict) -> str | None:
    return (obj.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)


def plan(desired: list[dict], observed: list[dict], owner_uid: str | None) -> list[Action]:
    """Actions in desired order, deletes last. Only objects controlled by `owner_uid` are deleted."""
    remaining = {key(o): o for o in observed}
    actions = []
    for want in desired:
        have = remaining.pop(key(want), None)
        if have is None:
            actions.append(Action("create", want, reason="missing"))
        elif have.get("metadata", {}).get("deletionTimestamp"):
            continue
        elif _immutable_changed(want, have):
            actions.append(Action("recreate", want, have, reason="immutable"))
        elif _spec_hash(want) != _spec_hash(have):
            actions.append(Action("update", want, have, reason="changed"))
        elif not is_subset(want, have):
            actions.append(Action("update", want, have, reason="drifted"))
    for have in remaining.values():
        if is_controlled_by(have, owner_uid) and not have["metadata"].get("deletionTimestamp"):
            actions.append(Action("delete", have, reason="orphan"))
    return actions
