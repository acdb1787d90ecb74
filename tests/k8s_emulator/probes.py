"""Container probes (httpGet, tcpSocket, exec) against a pod's local process.

Timing keeps the pod's meaning while polling faster: a probe runs every min(periodSeconds, 1) seconds, but
a liveness or startup probe only fails the container once it has failed for periodSeconds x
failureThreshold seconds without a success in between (after initialDelaySeconds), as on a kubelet.
"""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp


def resolve_port(port: Any, container: dict[str, Any], ports: dict[int, int]) -> int:
    """A probe's or Service's target port (number or container port name) -> the local port."""
    if isinstance(port, str) and not port.isdigit():
        named = next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port), None)
        if named is None:
            raise LookupError(f"container {container.get('name')!r} has no port named {port!r}")
        port = named
    return ports.get(int(port), int(port))


async def probe_once(probe: dict[str, Any], container: dict[str, Any], ports: dict[int, int],
                     session: aiohttp.ClientSession) -> tuple[bool, str]:
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            spec = probe["httpGet"]
            port = resolve_port(spec["port"], container, ports)
            url = f"{spec.get('scheme', 'HTTP').lower()}://127.0.0.1:{port}{spec.get('path', '/')}"
            headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
            async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout),
                                   allow_redirects=False) as response:
                ok = 200 <= response.status < 400
                return ok, f"HTTP probe failed with statuscode: {response.status}" if not ok else ""
        if "tcpSocket" in probe:
            port = resolve_port(probe["tcpSocket"]["port"], container, ports)
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
            writer.close()
            return True, ""
        if "exec" in probe:
            process = await asyncio.create_subprocess_exec(*probe["exec"]["command"],
                                                           stdout=asyncio.subprocess.DEVNULL,
                                                           stderr=asyncio.subprocess.DEVNULL)
            try:
                code = await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                process.kill()
                return False, "command timed out"
            return code == 0, f"command exited with {code}" if code else ""
        return True, ""  # grpc probes are not emulated: treated as passing
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, LookupError) as e:
        return False, f"probe failed: {type(e).__name__}: {e}"


class ProbeState:
    """Success/failure bookkeeping of one probe of one running container."""

    def __init__(self, probe: dict[str, Any] | None, started_at: float) -> None:
        self.probe = probe
        # the probe runs from here on: container start + initialDelaySeconds (later, after a startup probe)
        self.earliest = started_at + float((probe or {}).get("initialDelaySeconds", 0))
        self.last_success: float | None = None
        self.last_result = probe is None
        self.message = ""

    @property
    def interval(self) -> float:
        return min(float((self.probe or {}).get("periodSeconds", 10)), 1.0)

    def due(self, now: float) -> bool:
        return self.probe is not None and now >= self.earliest

    def record(self, ok: bool, message: str, now: float) -> None:
        self.last_result, self.message = ok, message
        if ok:
            self.last_success = now

    def has_failed(self, now: float) -> bool:
        """For liveness and startup: no success within period x failureThreshold after the initial delay."""
        if self.probe is None or self.last_result:
            return False
        allowance = float(self.probe.get("periodSeconds", 10)) * int(self.probe.get("failureThreshold", 3))
        since = self.last_success or self.earliest
        return now - since >= allowance
