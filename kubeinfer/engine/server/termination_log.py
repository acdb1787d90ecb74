"""The engine's fatal start-up error, written where Kubernetes reads a container's termination message.

The kubelet copies the file at the container's terminationMessagePath (default /dev/termination-log)
into the pod's status (state.terminated.message, then lastState), so the operator can tell "the
model did not load" from a crash without reading logs. The first line is MARKER, so the reader
knows the engine wrote it (rather than the log tail FallbackToLogsOnError gives otherwise).

Where: $KUBEINFER_TERMINATION_LOG when set (the operator sets it to /dev/termination-log), else
/dev/termination-log only if it exists (in a container the kubelet has created it; elsewhere nothing
is written). Writing never raises: a start-up error must still reach stderr and exit.
"""
from __future__ import annotations

import os

MARKER = "kubeinfer serve: start-up failed"
PATH_ENV = "KUBEINFER_TERMINATION_LOG"
DEFAULT_PATH = "/dev/termination-log"
MAX_BYTES = 4096   # what the kubelet keeps of a termination message


def termination_log_path() -> str | None:
    path = os.environ.get(PATH_ENV)
    if path:
        return path
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def write_termination_message(message: str) -> bool:
    """Write MARKER and `message` (cut to the kubelet's 4 KiB); True when written."""
    path = termination_log_path()
    if path is None:
        return False
    data = f"{MARKER}\n{message.strip()}\n".encode("utf-8", errors="replace")
    if len(data) > MAX_BYTES:
        data = data[:MAX_BYTES - 4] + b"...\n"
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError:
        return False
    return True
