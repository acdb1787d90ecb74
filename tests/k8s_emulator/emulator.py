"""The emulator as one object: API server, controllers, garbage collector and kubelet in a background
thread with its own event loop, on 127.0.0.1 and a free port.

    with Emulator(tmp_path) as emu:
        emu.write_kubeconfig(tmp_path / "kubeconfig")   # for kopf, kubectl-like clients
        ... emu.store (direct, thread-safe access), emu.service_url("ns", "svc:http"), emu.dump()
"""
from __future__ import annotations

import asyncio
import atexit
import json
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from .controllers import Controllers
from .endpointslices import EndpointSliceController, declared_port, kubelet_ports
from .gc import GarbageCollector
from .jobs import JobController
from .kubelet import Kubelet
from .leaderworkersets import LeaderWorkerSetController
from .proxy import make_proxy, service_url
from .server import ApiServer
from .store import Store
from .volumes import ClaimBinder

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class Emulator:
    def __init__(self, workdir: Path | str, *, token: str | None = "emulator-token", history_size: int = 10000,
                 with_kubelet: bool = True, with_controllers: bool = True, with_gc: bool = True,
                 kubelet_options: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.token = token
        self.store = Store(history_size=history_size)
        self.server = ApiServer(self.store, token)
        self.kubelet = Kubelet(self.store, self.workdir, **(kubelet_options or {})) if with_kubelet else None
        self.controllers = Controllers(self.store) if with_controllers else None
        self.endpointslices = EndpointSliceController(
            self.store, kubelet_ports(self.kubelet) if self.kubelet is not None else declared_port) \
            if with_controllers else None
        # idle until the LeaderWorkerSet CRD is installed (leaderworkersets.install_leaderworkerset_crd)
        self.leaderworkersets = LeaderWorkerSetController(self.store) if with_controllers else None
        self.jobs = JobController(self.store) if with_controllers else None
        self.claims = ClaimBinder(self.store) if with_controllers else None
        self.gc = GarbageCollector(self.store) if with_gc else None
        if self.kubelet is not None:
            self.server.proxy = make_proxy(self.kubelet)
            self.server.logs = self.kubelet.logs
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        ns_type = self.store.registry.lookup("", "v1", "namespaces")
        for name in SYSTEM_NAMESPACES:
            self.store.create(ns_type, None, {"metadata": {"name": name}})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle ----
    def start(self) -> "Emulator":
        self._thread = threading.Thread(target=self._main, name="k8s-emulator", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._error
        atexit.register(self._kill_processes)
        return self

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.server.make_app(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        for part in (self.gc, self.controllers, self.leaderworkersets, self.jobs, self.claims,
                     self.endpointslices, self.kubelet):
            if part is not None:
                self._tasks.append(asyncio.create_task(part.run(), name=type(part).__name__))

    async def _stop(self) -> None:
        self.server.hub.close_all()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            try:
                # a client that keeps a watch open must not hold the test's teardown hostage
                await asyncio.wait_for(self._runner.cleanup(), timeout=10)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        if self.loop is None or not self.loop.is_running():
            self._kill_processes()
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)
        except TimeoutError:
            pass  # stopping the loop below ends whatever is left
        finally:
            self._kill_processes()
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)

    def _kill_processes(self) -> None:
        if self.kubelet is not None:
            self.kubelet.kill_all_sync()

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run a coroutine on the emulator's loop from another thread."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # ---- for tests ----
    def write_kubeconfig(self, path: Path | str, namespace: str = "default") -> Path:
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator", "preferences": {},
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": user}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                          "namespace": namespace}}],
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config))
        return path

    def service_url(self, namespace: str, name_port: str) -> str:
        """Direct http://127.0.0.1:PORT of a ready pod behind a Service (raises ApiError 503 when none)."""
        assert self.kubelet is not None
        return service_url(self.kubelet, namespace, name_port)

    def proxy_url(self, namespace: str, name_port: str) -> str:
        """The API server's proxy URL of a Service, as `kubectl proxy` exposes it."""
        return f"{self.url}/api/v1/namespaces/{namespace}/services/{name_port}/proxy"

    def dump(self, namespace: str | None = None, full: bool = False) -> str:
        """Every object, one line each (or as YAML with full=True): what a failed test should print."""
        lines = []
        for rt, obj in sorted(self.store.all_objects(), key=lambda x: (x[0].kind, x[1]["metadata"].get("namespace", ""),
                                                                        x[1]["metadata"]["name"])):
            meta = obj["metadata"]
            if namespace is not None and meta.get("namespace") not in (namespace, None):
                continue
            if rt.kind in ("Namespace", "Node") and namespace is not None:
                continue
            if full:
                lines.append(yaml.safe_dump(obj, sort_keys=False) + "---")
                continue
            where = f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
            extra = {k: meta[k] for k in ("deletionTimestamp", "finalizers") if meta.get(k)}
            owners = [f"{r['kind']}/{r['name']}" for r in meta.get("ownerReferences") or []]
            summary = _summary(rt.kind, obj)
            lines.append(f"{rt.kind} {where} rv={meta.get('resourceVersion')} gen={meta.get('generation')}"
                         f"{' owners=' + ','.join(owners) if owners else ''}{' ' + json.dumps(extra) if extra else ''}"
                         f" {summary}")
        return "\n".join(lines)


def _summary(kind: str, obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    if kind == "Pod":
        cs = (status.get("containerStatuses") or [{}])[0]
        conditions = [f"{c['type']}={c['status']}" for c in status.get("conditions") or []]
        return (f"phase={status.get('phase')} ready={cs.get('ready')} restarts={cs.get('restartCount')} "
                f"state={json.dumps(cs.get('state'))} conditions={conditions}")
    if kind == "Event":
        return f"{obj.get('type')} {obj.get('reason')}: {obj.get('message')}"
    if kind in ("Namespace", "Node", "CustomResourceDefinition", "Secret", "ConfigMap"):
        return ""
    text = json.dumps({"spec": obj.get("spec"), "status": status} if kind not in ("Deployment", "ReplicaSet")
                      else {"replicas": (obj.get("spec") or {}).get("replicas"), "status": status})
    return text if len(text) < 1500 else text[:1500] + "..."
