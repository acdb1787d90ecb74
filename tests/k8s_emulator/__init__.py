"""A Kubernetes API emulator for tests: the API server's semantics kopf and clients rely on, a
Deployment/ReplicaSet controller, a garbage collector, and a stand-in kubelet that runs each pod's first
container as a local process. Test infrastructure, not product: see README.md for what is emulated and
what is not."""
from .emulator import Emulator
from .errors import ApiError
from .store import Store

__all__ = ["ApiError", "Emulator", "Store"]
