"""Fixtures for the emulator's own tests: an emulator (with or without kubelet) and an HTTP client."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.k8s_emulator import Emulator

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com", "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas",
                                                     "statusReplicasPath": ".status.replicas"}},
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "required": ["size"], "properties": {
                    "size": {"type": "integer", "minimum": 1},
                    "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                    "replicas": {"type": "integer", "default": 1},
                    "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                }},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            }}},
        }],
    },
}


class Client:
    """A tiny kubectl: JSON over httpx, raising nothing, returning (code, body)."""

    def __init__(self, emu: Emulator) -> None:
        self.http = httpx.Client(base_url=emu.url, headers={"Authorization": f"Bearer {emu.token}"}, timeout=10)

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
             **params: Any) -> tuple[int, Any]:
        r = self.http.request(method, path, params=params or None,
                              content=None if body is None else json.dumps(body),
                              headers={"Content-Type": content_type})
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        code, data = self.call(method, path, body, **kwargs)
        assert 200 <= code < 300, (code, data)
        return data

    def watch(self, path: str, **params: Any) -> list[dict[str, Any]]:
        """All events of a watch that ends by timeoutSeconds."""
        params = {"watch": "true", "timeoutSeconds": "1", **params}
        with self.http.stream("GET", path, params=params) as r:
            return [json.loads(line) for line in r.iter_lines() if line.strip()]


@pytest.fixture
def emu(tmp_path) -> Iterator[Emulator]:
    with Emulator(tmp_path, with_kubelet=False) as e:
        yield e


@pytest.fixture
def kube(emu: Emulator) -> Client:
    return Client(emu)


@pytest.fixture
def emu_with_kubelet(tmp_path) -> Iterator[Emulator]:
    with Emulator(tmp_path, kubelet_options={"max_grace": 2.0, "crash_backoff": (0.2, 1.0)}) as e:
        yield e
