"""A stand-in kubelet (and scheduler) for one node: every pod becomes a local process.

For each pod: schedule it onto the node (or leave it Pending/Unschedulable when it asks for more
`nvidia.com/gpu` than the node has, or its nodeSelector does not match), start its first container as a
local process (see podenv for the command, env and port mapping), run its startup, readiness and liveness
probes, and keep the pod's status as a kubelet would: phase, conditions, containerStatuses with
ready/started/restartCount, Running / Terminated / CrashLoopBackOff states. When the pod is deleted the
process gets SIGTERM, then SIGKILL after the grace period (capped at `max_grace` seconds), and the
kubelet finishes the deletion. Further containers and init containers are not run; they are reported as
running and ready. Volumes are not mounted: the process sees the host's filesystem, except that args and
env values naming a path under an emptyDir or persistentVolumeClaim mountPath are rewritten to a local
directory (podenv).
The termination message file (terminationMessagePath, default /dev/termination-log) is a local file
per pod: args and env values naming the path are rewritten to it, and its content becomes
state.terminated.message; a failed container with FallbackToLogsOnError that wrote none gets the
tail of its log.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from . import podenv
from .admission import now
from .errors import ApiError
from .probes import ProbeState, probe_once
from .store import Store

log = logging.getLogger(__name__)
TERMINATION_MESSAGE_PATH = "/dev/termination-log"   # the container default


@dataclasses.dataclass
class PodRuntime:
    uid: str
    namespace: str
    name: str
    log_path: Path
    terminating: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    ports: dict[int, int] = dataclasses.field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    restart_count: int = 0
    log_offset: int = 0  # where the current container's output starts in the log
    started: bool = False
    ready: bool = False
    state: dict[str, Any] = dataclasses.field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    phase: str = "Pending"
    start_time: str = dataclasses.field(default_factory=now)
    transitions: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


class Kubelet:
    def __init__(self, store: Store, workdir: Path, node_name: str = "emulator-node", gpus: int = 0,
                 base_env: dict[str, str] | None = None, command_map: dict[str, list[str]] | None = None,
                 entrypoints: dict[str, list[str]] | None = None, max_grace: float = 10.0,
                 crash_backoff: tuple[float, float] = (1.0, 10.0), node_labels: dict[str, str] | None = None) -> None:
        self.store = store
        self.workdir = Path(workdir)
        self.node_name = node_name
        self.gpus = gpus
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.base_env.pop("KUBECONFIG", None)
        self.command_map = command_map or podenv.default_command_map()
        self.entrypoints = entrypoints or {"kubeinfer": ["kubeinfer", "serve"]}
        self.max_grace = max_grace
        self.crash_backoff = crash_backoff
        self.node_labels = {"kubernetes.io/hostname": node_name, "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64", **(node_labels or {})}
        self.runtimes: dict[str, PodRuntime] = {}
        self.pids: set[int] = set()
        self.pods = store.registry.lookup("", "v1", "pods")
        self.session: aiohttp.ClientSession | None = None

    # ---- the node ----
    def _register_node(self) -> None:
        rt = self.store.registry.lookup("", "v1", "nodes")
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": "64Gi", "pods": "110"}
        if self.gpus:
            capacity["nvidia.com/gpu"] = str(self.gpus)
        if self.store.try_get(rt, None, self.node_name) is None:
            self.store.create(rt, None, {"metadata": {"name": self.node_name, "labels": self.node_labels}})
        status = {"capacity": capacity, "allocatable": capacity,
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}
        self.store.update(rt, None, self.node_name, lambda n: {**n, "status": status}, "status")

    async def run(self) -> None:
        self.store.graceful_pod_deletion = True
        self._register_node()
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        self.session = aiohttp.ClientSession()
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        unsubscribe = self.store.add_listener(
            lambda ev: loop.call_soon_threadsafe(wake.set) if ev.key == ("", "pods") else None)
        try:
            while True:
                self._sync()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.5)
                wake.clear()
        finally:
            unsubscribe()
            self.store.graceful_pod_deletion = False
            await self.shutdown()
            await self.session.close()

    def _sync(self) -> None:
        current = {p["metadata"]["uid"]: p for p in self.store.items(self.pods)}
        for uid, pod in current.items():
            meta = pod["metadata"]
            runtime = self.runtimes.get(uid)
            if runtime is None:
                if meta.get("deletionTimestamp"):
                    self._finish_deletion(meta["namespace"], meta["name"], uid)
                elif (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                    runtime = PodRuntime(uid, meta["namespace"], meta["name"],
                                         self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}.log")
                    self.runtimes[uid] = runtime
                    runtime.task = asyncio.create_task(self._pod_worker(runtime), name=f"pod {meta['name']}")
            elif meta.get("deletionTimestamp"):
                runtime.terminating.set()
        for uid, runtime in list(self.runtimes.items()):
            if uid not in current:  # removed behind the kubelet's back (grace 0): stop at once
                runtime.terminating.set()

    def _finish_deletion(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.store.delete(self.pods, namespace, name, grace_period=0, preconditions={"uid": uid})
        except ApiError as e:
            if e.code not in (404, 409):
                raise

    # ---- status ----
    def _publish(self, runtime: PodRuntime, pod: dict[str, Any]) -> None:
        containers = pod["spec"]["containers"]
        conditions = []
        for kind, ok in (("PodReadyToStartContainers", True), ("Initialized", True),
                         ("Ready", runtime.ready), ("ContainersReady", runtime.ready), ("PodScheduled", True)):
            status = "True" if ok else "False"
            if runtime.transitions.get(kind, ("", ""))[0] != status:
                runtime.transitions[kind] = (status, now())
            conditions.append({"type": kind, "status": status, "lastProbeTime": None,
                               "lastTransitionTime": runtime.transitions[kind][1],
                               **({} if ok else {"reason": "ContainersNotReady", "message":
                                                  f"containers with unready status: [{containers[0]['name']}]"})})
        statuses = [{"name": containers[0]["name"], "image": containers[0].get("image", ""), "imageID": "",
                     "containerID": f"emulator://{runtime.process.pid}" if runtime.process else "",
                     "ready": runtime.ready, "started": runtime.started, "restartCount": runtime.restart_count,
                     "state": runtime.state, "lastState": runtime.last_state}]
        statuses += [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
                      "restartCount": 0, "state": {"running": {"startedAt": runtime.start_time}}, "lastState": {}}
                     for c in containers[1:]]
        status = {"phase": runtime.phase, "conditions": conditions, "hostIP": "127.0.0.1",
                  "hostIPs": [{"ip": "127.0.0.1"}], "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                  "startTime": runtime.start_time, "qosClass": _qos_class(containers),
                  "containerStatuses": statuses}
        self._write_status(runtime, status)

    def _write_status(self, runtime: PodRuntime, status: dict[str, Any]) -> None:
        def mutate(pod: dict[str, Any]) -> dict[str, Any]:
            pod["status"] = status
            return pod
        with contextlib.suppress(ApiError):
            self.store.update(self.pods, runtime.namespace, runtime.name, mutate, "status")

    def _current(self, runtime: PodRuntime) -> dict[str, Any] | None:
        pod = self.store.try_get(self.pods, runtime.namespace, runtime.name)
        return pod if pod is not None and pod["metadata"]["uid"] == runtime.uid else None

    # ---- scheduling ----
    def _unschedulable_reason(self, pod: dict[str, Any]) -> str | None:
        spec = pod["spec"]
        wanted = 0
        for c in spec.get("containers") or []:
            resources = c.get("resources") or {}
            amount = (resources.get("limits") or {}).get("nvidia.com/gpu") or \
                (resources.get("requests") or {}).get("nvidia.com/gpu") or 0
            wanted += int(amount)
        if wanted > self.gpus:
            return "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available: " \
                   "1 No preemption victims found for incoming pod."
        selector = spec.get("nodeSelector") or {}
        if any(self.node_labels.get(k) != v for k, v in selector.items()):
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
        return None

    # ---- the pod's life ----
    async def _pod_worker(self, runtime: PodRuntime) -> None:
        try:
            pod = self._current(runtime)
            if pod is None:
                return
            reason = self._unschedulable_reason(pod)
            if reason is not None:
                self._write_status(runtime, {"phase": "Pending", "qosClass": _qos_class(pod["spec"]["containers"]),
                                             "conditions": [{"type": "PodScheduled", "status": "False",
                                                             "reason": "Unschedulable", "message": reason,
                                                             "lastProbeTime": None, "lastTransitionTime": now()}]})
                await runtime.terminating.wait()
                return
            if not pod["spec"].get("nodeName"):
                self.store.update(self.pods, runtime.namespace, runtime.name,
                                  lambda p: {**p, "spec": {**p["spec"], "nodeName": self.node_name}})
            self._publish(runtime, pod)
            await self._run_containers(runtime)
        except Exception:
            log.exception("kubelet: pod %s/%s failed", runtime.namespace, runtime.name)
        finally:
            await self._kill(runtime, grace=0)
            self.runtimes.pop(runtime.uid, None)
            if runtime.terminating.is_set():
                self._finish_deletion(runtime.namespace, runtime.name, runtime.uid)

    async def _run_containers(self, runtime: PodRuntime) -> None:
        while not runtime.terminating.is_set():
            pod = self._current(runtime)
            if pod is None:
                return
            container = pod["spec"]["containers"][0]
            try:
                env = podenv.container_env(self.store, pod, container, self.base_env)
                argv = podenv.container_argv(container, env, self.command_map, self.entrypoints)
            except podenv.ContainerConfigError as e:
                runtime.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                self._publish(runtime, pod)
                await _wait(runtime.terminating, 1.0)
                continue
            if not runtime.ports:
                runtime.ports = {int(p["containerPort"]): podenv.free_port() for p in container.get("ports") or []}
                runtime.ports.update(podenv.group_ports(pod))   # shared by a LeaderWorkerSet group
            declared = {v["name"] for v in container.get("env") or []}
            argv, env, rewritten = podenv.remap_ports(argv, env, declared, runtime.ports)
            mounts = podenv.volume_dirs(pod, container, self.workdir)
            # the termination message file: a fresh local file per start, named by the same rewrite
            termination = self.workdir / "pods" / f"{runtime.namespace}_{runtime.name}.termination-log"
            termination.write_bytes(b"")
            mounts[container.get("terminationMessagePath") or TERMINATION_MESSAGE_PATH] = str(termination)
            argv, env = podenv.remap_paths(argv, env, declared, mounts)
            if runtime.ports and not rewritten:  # it will listen on the container port itself
                runtime.ports = {p: p for p in runtime.ports}
            with open(runtime.log_path, "ab") as logfile:
                logfile.write(f"--- {now()} kubelet: starting {argv}\n".encode())
                logfile.flush()
                runtime.log_offset = logfile.tell()
                workdir = container.get("workingDir", "")
                runtime.process = await asyncio.create_subprocess_exec(
                    *argv, env=env, cwd=workdir if os.path.isdir(workdir) else None, stdin=asyncio.subprocess.DEVNULL,
                    stdout=logfile, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            self.pids.add(runtime.process.pid)
            runtime.phase, runtime.started, runtime.ready = "Running", False, False
            runtime.state = {"running": {"startedAt": now()}}
            self._publish(runtime, pod)
            outcome = await self._supervise(runtime, pod, container)
            if outcome == "terminating":
                return
            code = runtime.process.returncode if runtime.process.returncode is not None else 137
            code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as a container runtime says
            self.pids.discard(runtime.process.pid)
            finished = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                       "startedAt": runtime.state.get("running", {}).get("startedAt"),
                                       "finishedAt": now()}}
            # as a kubelet: the file's content (4 KiB) wins; with FallbackToLogsOnError a failed
            # container that wrote none gets the tail of its log
            message = termination.read_bytes()[:4096].decode(errors="replace")
            if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                with open(runtime.log_path, "rb") as logfile:
                    logfile.seek(runtime.log_offset)
                    tail = "\n".join(logfile.read().decode(errors="replace").splitlines()[-80:])
                message = tail[-2048:]
            if message:
                finished["terminated"]["message"] = message
            runtime.started = runtime.ready = False
            policy = pod["spec"].get("restartPolicy", "Always")
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                runtime.phase, runtime.state = ("Succeeded" if code == 0 else "Failed"), finished
                self._publish(runtime, pod)
                await runtime.terminating.wait()
                return
            runtime.restart_count += 1
            runtime.last_state = finished
            backoff = min(self.crash_backoff[0] * 2 ** (runtime.restart_count - 1), self.crash_backoff[1])
            runtime.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off {backoff:g}s "
                                         f"restarting failed container={container['name']} pod={runtime.name}"}}
            self._publish(runtime, pod)
            await _wait(runtime.terminating, backoff)

    async def _supervise(self, runtime: PodRuntime, pod: dict[str, Any], container: dict[str, Any]) -> str:
        """Run the probes until the process exits ("exited"), is killed as unhealthy ("unhealthy"), or the pod
        is being deleted ("terminating")."""
        assert runtime.process is not None and self.session is not None
        start = time.monotonic()
        startup = ProbeState(container.get("startupProbe"), start)
        readiness = ProbeState(container.get("readinessProbe"), start)
        liveness = ProbeState(container.get("livenessProbe"), start)
        next_due = {id(p): 0.0 for p in (startup, readiness, liveness)}
        while True:
            if runtime.terminating.is_set():
                await self._kill(runtime, grace=self._grace(runtime))
                return "terminating"
            if runtime.process.returncode is not None:
                return "exited"
            t = time.monotonic()
            active = [startup] if not runtime.started and startup.probe else [readiness, liveness]
            due = [p for p in active if p.due(t) and t >= next_due[id(p)]]
            results = await asyncio.gather(*(probe_once(p.probe, container, runtime.ports, self.session)
                                             for p in due))
            t = time.monotonic()
            for p, (ok, message) in zip(due, results):
                p.record(ok, message, t)
                next_due[id(p)] = t + p.interval
            was = (runtime.started, runtime.ready)
            if not runtime.started and (startup.probe is None or startup.last_result):
                runtime.started = True
                for p in (readiness, liveness):
                    p.earliest = max(p.earliest, t)
            runtime.ready = runtime.started and readiness.last_result
            if any(p.has_failed(t) for p in (startup, liveness)):
                failed = startup if startup.has_failed(t) else liveness
                with open(runtime.log_path, "ab") as logfile:
                    logfile.write(f"--- {now()} kubelet: container unhealthy, killing: {failed.message}\n".encode())
                await self._kill(runtime, grace=self._grace(runtime))
                return "unhealthy"
            if (runtime.started, runtime.ready) != was:
                self._publish(runtime, pod)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(runtime.terminating.wait(), 0.25)

    def _grace(self, runtime: PodRuntime) -> float:
        pod = self.store.try_get(self.pods, runtime.namespace, runtime.name) or {"metadata": {}}
        grace = pod["metadata"].get("deletionGracePeriodSeconds", 30)
        return min(float(grace if grace is not None else 30), self.max_grace)

    async def _kill(self, runtime: PodRuntime, grace: float) -> None:
        process = runtime.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            await asyncio.wait_for(process.wait(), max(grace, 0.1))
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever the engine started in its group
        self.pids.discard(process.pid)

    async def shutdown(self) -> None:
        for runtime in list(self.runtimes.values()):
            runtime.terminating.set()
            if runtime.task is not None:
                runtime.task.cancel()
        for runtime in list(self.runtimes.values()):
            await self._kill(runtime, grace=0)
        self.kill_all_sync()

    def kill_all_sync(self) -> None:
        """Last resort from any thread (a test's finalizer, atexit): SIGKILL every process group started."""
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.pids.clear()

    # ---- for the proxy, pod logs and tests ----
    def runtime_of(self, namespace: str, name: str) -> PodRuntime | None:
        return next((r for r in self.runtimes.values() if (r.namespace, r.name) == (namespace, name)), None)

    def logs(self, namespace: str, name: str, container: str | None = None) -> str | None:
        path = self.workdir / "pods" / f"{namespace}_{name}.log"
        return path.read_text(errors="replace") if path.exists() else None


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


def _qos_class(containers: list[dict[str, Any]]) -> str:
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    guaranteed = all(r.get("limits") and all(k in r["limits"] for k in ("cpu", "memory"))
                     and (r.get("requests") or r["limits"]) == r["limits"] for r in resources)
    return "Guaranteed" if guaranteed else "Burstable"
