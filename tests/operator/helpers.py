"""Test helpers: a spec builder, example loading, and an in-memory Kubernetes API (FakeApi)."""
from __future__ import annotations

import copy
import itertools
from pathlib import Path

import yaml

from kubeinfer.operator.apply import RESOURCES, ApiError, KubeApi
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def make_settings(**overrides) -> OperatorSettings:
    return OperatorSettings(engine_image="registry.example/kubeinfer:test", **overrides)


def with_model(spec: dict | None) -> dict:
    """`spec` with spec.model.uri "default" unless it names one (the field is required)."""
    spec = dict(spec or {})
    if isinstance(spec.get("model", {}), dict):
        spec["model"] = {"uri": "default", **spec.get("model", {})}
    return spec


def make_spec(spec: dict | None = None, name: str = "llm", namespace: str = "ns",
              pipeline_supported: bool = True):
    """A parsed spec; pipeline > 1 is accepted, so the multi-pod rendering stays tested."""
    return parse_spec(name, namespace, with_model(spec), default_image="registry.example/kubeinfer:test",
                      pipeline_supported=pipeline_supported)


def example_docs(filename: str) -> list[dict]:
    docs = yaml.safe_load_all((EXAMPLES / filename).read_text())
    return [d for d in docs if d and d.get("kind") == "InferenceService"]


def inference_service(spec: dict | None = None, name: str = "llm", namespace: str = "ns",
                      uid: str = "uid-1", generation: int = 1) -> dict:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation},
            "spec": with_model(spec)}


_PLURALS = {plural: kind for kind, (_, plural) in RESOURCES.items()}


class FakeApi(KubeApi):
    """KubeApi over an in-memory store, answering like the API server (201/409/404/422, resourceVersion)."""

    def __init__(self, lws: bool = False, pools: bool = False):
        super().__init__(api_client=object())
        self.pools = pools
        self.objects: dict[tuple[str, str, str], dict] = {}   # (kind, namespace, name)
        self.calls: list[tuple[str, str]] = []
        self.lws = lws
        self.fail: dict[tuple[str, str], ApiError] = {}       # (method, kind) -> error to raise once
        self.logs: dict[tuple[str, str], str] = {}            # (namespace, pod) -> its log
        self._rv = itertools.count(1)

    def _parse(self, path: str):
        parts = path.strip("/").split("/")
        i = parts.index("namespaces")
        kind = _PLURALS[parts[i + 2]]
        name = parts[i + 3] if len(parts) > i + 3 else None
        return kind, parts[i + 1], name

    def request(self, method, path, body=None, query=None, content_type="application/json"):
        self.calls.append((method, path))
        if path == "/apis/leaderworkerset.x-k8s.io/v1":
            if not self.lws:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {"resources": [{"name": "leaderworkersets"}]}
        if path == "/apis/inference.networking.k8s.io/v1":
            if not self.pools:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {"resources": [{"name": "inferencepools"}]}
        kind, ns, name = self._parse(path)
        error = self.fail.pop((method, kind), None)
        if error is not None:
            raise error
        if method == "GET" and name is None:
            want = dict(kv.split("=") for kv in dict(query or [])["labelSelector"].split(","))
            items = [copy.deepcopy(o) for (k, n, _), o in self.objects.items() if k == kind and n == ns
                     and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in want.items())]
            for item in items:   # like the API server, list items lack apiVersion/kind
                item.pop("apiVersion", None), item.pop("kind", None)
            return {"items": items}
        key = (kind, ns, name or body["metadata"]["name"])
        if method == "GET":
            if key not in self.objects:
                raise ApiError(404, "NotFound", f"{kind} {key[2]} not found")
            return copy.deepcopy(self.objects[key])
        if method == "POST":
            if key in self.objects:
                raise ApiError(409, "AlreadyExists", f"{kind} {key[2]} already exists")
            obj = copy.deepcopy(body)
            obj["metadata"].update(uid=f"uid-{key[2]}", resourceVersion=str(next(self._rv)))
            self.objects[key] = obj
            return copy.deepcopy(obj)
        if method == "PUT":
            if key not in self.objects:
                raise ApiError(404, "NotFound", f"{kind} {key[2]} not found")
            if body["metadata"].get("resourceVersion") != self.objects[key]["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified")
            obj = copy.deepcopy(body)
            obj["metadata"]["resourceVersion"] = str(next(self._rv))
            obj["metadata"]["uid"] = self.objects[key]["metadata"].get("uid")
            self.objects[key] = obj
            return copy.deepcopy(obj)
        if method == "DELETE":
            if key not in self.objects:
                raise ApiError(404, "NotFound", f"{kind} {key[2]} not found")
            return self.objects.pop(key)
        if method == "PATCH" and path.endswith("/status") and content_type == "application/merge-patch+json":
            if key not in self.objects:
                raise ApiError(404, "NotFound", f"{kind} {key[2]} not found")
            obj = self.objects[key]
            if body["metadata"].get("resourceVersion") not in (None, obj["metadata"]["resourceVersion"]):
                raise ApiError(409, "Conflict", "the object has been modified")
            obj["status"] = {**(obj.get("status") or {}), **body["status"]}
            obj["metadata"]["resourceVersion"] = str(next(self._rv))
            return copy.deepcopy(obj)
        if method == "PATCH" and content_type == "application/merge-patch+json":
            if key not in self.objects:
                raise ApiError(404, "NotFound", f"{kind} {key[2]} not found")
            obj = self.objects[key]
            if (body.get("metadata") or {}).get("resourceVersion") not in (None, obj["metadata"]["resourceVersion"]):
                raise ApiError(409, "Conflict", "the object has been modified")
            for part, values in body.items():
                if part != "metadata":
                    obj[part] = {**(obj.get(part) or {}), **values}
            obj["metadata"]["resourceVersion"] = str(next(self._rv))
            if "spec" in body:
                obj["metadata"]["generation"] = obj["metadata"].get("generation", 0) + 1
            return copy.deepcopy(obj)
        raise AssertionError(f"unexpected {method} {path}")

    def pod_log(self, namespace: str, name: str, tail_lines: int) -> str:
        self.calls.append(("GET", f"/api/v1/namespaces/{namespace}/pods/{name}/log"))
        if (namespace, name) not in self.logs:
            raise ApiError(404, "NotFound", f"pod {name} has no log")
        return "\n".join(self.logs[(namespace, name)].splitlines()[-tail_lines:])

    def put_object(self, obj: dict) -> None:
        meta = obj["metadata"]
        obj = copy.deepcopy(obj)
        obj["metadata"].setdefault("resourceVersion", str(next(self._rv)))
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj

    def kinds(self) -> list[tuple[str, str]]:
        return sorted((k, n) for k, _, n in self.objects)
