"""How the stand-in kubelet turns a container spec into a local command line and environment.

- The image is ignored. The container's `command` (or, with none, the image's entrypoint from
  `entrypoints`) is mapped to a local executable: `kubeinfer` -> the test's virtualenv's `kubeinfer`,
  `python`/`python3` -> the test's interpreter.
- `$(VAR)` references in command and args are expanded from the container's environment, as Kubernetes does.
- Every containerPort gets a free local port; `--port 8000`, `--port=8000` and env values equal to the
  container port are rewritten to it, so that several pods can listen on "8000" at once. Ports a
  group of pods must share (a multi-node engine's `--master-port`) come from the pod's
  `k8s-emulator.kubeinfer.io/group-ports` annotation, which the LeaderWorkerSet controller writes
  once per group (`group_ports`); `--master-port N` is rewritten like `--port N`.
- env: value, valueFrom secretKeyRef / configMapKeyRef / fieldRef (metadata.name, metadata.namespace,
  metadata.uid, metadata.labels['x'], spec.nodeName, status.podIP), resourceFieldRef (limits/requests
  as written); envFrom secretRef / configMapRef. Secrets' data is base64-decoded.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from .store import Store


class ContainerConfigError(Exception):
    """The pod cannot start this container (status reason CreateContainerConfigError)."""


PORT_FLAGS = ("--port", "-p", "--master-port")
GROUP_PORTS_ANNOTATION = "k8s-emulator.kubeinfer.io/group-ports"


def group_ports(pod: dict[str, Any]) -> dict[int, int]:
    """containerPort -> the local port every pod of its group uses (from the annotation)."""
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(GROUP_PORTS_ANNOTATION)
    return {int(k): int(v) for k, v in json.loads(raw).items()} if raw else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_command_map() -> dict[str, list[str]]:
    bin_dir = Path(sys.executable).parent
    kubeinfer = bin_dir / "kubeinfer"
    return {
        "kubeinfer": [str(kubeinfer)] if kubeinfer.exists() else [sys.executable, "-m", "kubeinfer.cli"],
        "python": [sys.executable], "python3": [sys.executable],
    }


def _lookup(store: Store, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    rt = store.registry.lookup("", "v1", "secrets" if kind == "secret" else "configmaps")
    assert rt is not None
    return store.try_get(rt, namespace, name)


def _data(obj: dict[str, Any], kind: str) -> dict[str, str]:
    if kind == "secret":
        data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        data.update(obj.get("stringData") or {})
        return data
    return dict(obj.get("data") or {})


def _key_ref(store: Store, namespace: str, kind: str, ref: dict[str, Any], var: str) -> str | None:
    obj = _lookup(store, kind, namespace, ref.get("name", ""))
    if obj is None or ref.get("key") not in _data(obj, kind):
        if ref.get("optional"):
            return None
        what = f'{kind} "{ref.get("name")}"' if obj is None else f'key "{ref.get("key")}" in {kind} "{ref.get("name")}"'
        raise ContainerConfigError(f"couldn't find {what} (for env {var})")
    return _data(obj, kind)[ref["key"]]


def _field_ref(pod: dict[str, Any], path: str) -> str:
    meta = pod["metadata"]
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", ""),
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": (pod.get("spec") or {}).get("nodeName", ""),
              "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", "default"),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    raise ContainerConfigError(f"unsupported fieldRef {path!r}")


def container_env(store: Store, pod: dict[str, Any], container: dict[str, Any],
                  base: dict[str, str]) -> dict[str, str]:
    namespace = pod["metadata"].get("namespace", "default")
    env = dict(base)
    env.update({"HOSTNAME": pod["metadata"]["name"], "KUBERNETES_SERVICE_HOST": "127.0.0.1"})
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind in ("secret", "configMap"):
            ref = source.get(f"{kind}Ref")
            if ref is None:
                continue
            obj = _lookup(store, kind.lower(), namespace, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'{kind} "{ref.get("name")}" not found')
            env.update({prefix + k: v for k, v in _data(obj, kind.lower()).items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var:
            env[name] = expand(str(var["value"]), env)
            continue
        source = var.get("valueFrom") or {}
        value: str | None = None
        if "secretKeyRef" in source:
            value = _key_ref(store, namespace, "secret", source["secretKeyRef"], name)
        elif "configMapKeyRef" in source:
            value = _key_ref(store, namespace, "configmap", source["configMapKeyRef"], name)
        elif "fieldRef" in source:
            value = _field_ref(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, _, resource = ref["resource"].partition(".")
            value = str(((container.get("resources") or {}).get(kind) or {}).get(resource, "0"))
        else:
            value = ""
        if value is not None:
            env[name] = value
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; $$(VAR) escapes; unknown references stay as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_argv(container: dict[str, Any], env: dict[str, str], command_map: dict[str, list[str]],
                   entrypoints: dict[str, list[str]]) -> list[str]:
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if not command:
        image = container.get("image", "")
        entry = next((cmd for prefix, cmd in entrypoints.items() if prefix in image), None)
        if entry is None:
            raise ContainerConfigError(f"no local entrypoint for image {image!r} and no command given")
        command = entry
    argv = [expand(a, env) for a in command + args]
    head = command_map.get(argv[0]) or command_map.get(os.path.basename(argv[0]))
    if head is not None:
        argv = head + argv[1:]
    elif shutil.which(argv[0]) is None:
        raise ContainerConfigError(f'exec: "{argv[0]}": executable file not found in $PATH')
    return argv


def remap_ports(argv: list[str], env: dict[str, str], declared: set[str], ports: dict[int, int],
                ) -> tuple[list[str], dict[str, str], bool]:
    """Point `--port N` / `--port=N` and declared env values N at the local port chosen for container port
    N. Returns the new argv and env, and whether anything was rewritten."""
    out, rewritten = list(argv), False
    for i, arg in enumerate(out):
        for container_port, local in ports.items():
            if arg in PORT_FLAGS and i + 1 < len(out) and out[i + 1] == str(container_port):
                out[i + 1], rewritten = str(local), True
            elif arg in (f"{f}={container_port}" for f in PORT_FLAGS):
                out[i], rewritten = f"{arg.split('=')[0]}={local}", True
    env = dict(env)
    for key in declared:
        value = env.get(key, "")
        if value.isdigit() and int(value) in ports:
            env[key], rewritten = str(ports[int(value)]), True
    return out, env, rewritten


def volume_dirs(pod: dict[str, Any], container: dict[str, Any], workdir: Path) -> dict[str, str]:
    """mountPath -> local directory. emptyDir: a fresh directory per pod; persistentVolumeClaim: one
    directory per claim (shared by the pods that mount it); hostPath: the path itself. Other volume
    kinds (configMap, secret, ...) are not materialized."""
    meta = pod["metadata"]
    volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
    result = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount.get("name"), {})
        if "emptyDir" in volume:
            local = workdir / "pods" / f"{meta['namespace']}_{meta['name']}" / "volumes" / volume["name"]
        elif "persistentVolumeClaim" in volume:
            local = workdir / "pvcs" / meta["namespace"] / volume["persistentVolumeClaim"]["claimName"]
        elif "hostPath" in volume:
            continue
        else:
            continue
        if mount.get("subPath"):
            local = local / mount["subPath"]
        local.mkdir(parents=True, exist_ok=True)
        result[mount["mountPath"].rstrip("/")] = str(local)
    return result


def remap_paths(argv: list[str], env: dict[str, str], declared: set[str], mounts: dict[str, str],
                ) -> tuple[list[str], dict[str, str]]:
    """Rewrite args and declared env values that name a path under a mountPath to the local directory."""
    def rewrite(value: str) -> str:
        for mount_path, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
            if value == mount_path or value.startswith(mount_path + "/"):
                return local + value[len(mount_path):]
        return value
    env = dict(env)
    for key in declared:
        if key in env:
            env[key] = rewrite(env[key])
    return [rewrite(a) for a in argv], env
