"""Per-InferenceService locks: one reconcile, restore or status refresh of an object at a time.

kopf runs the change handlers, the resync timer and the handlers of child and pod events in
different tasks and threads; without a lock a Deployment deleted by hand could be restored by two
of them at once (one of them meeting 409 AlreadyExists) and a status refresh could patch between a
reconcile's read and its write. Handlers are sync functions in kopf's thread pool, so these are
threading locks; nothing holds two of them, so they cannot deadlock.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ObjectLocks:
    """A lock per (namespace, name), created on first use and dropped by `forget`."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}

    @contextmanager
    def hold(self, namespace: str, name: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault((namespace, name), threading.Lock())
        with lock:
            yield

    def forget(self, namespace: str, name: str) -> None:
        """The object is gone; a later `hold` makes a new lock."""
        with self._guard:
            self._locks.pop((namespace, name), None)

    def __len__(self) -> int:
        return len(self._locks)
