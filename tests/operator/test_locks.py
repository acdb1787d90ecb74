"""locks.ObjectLocks, and that the handlers hold them: a restore of a deleted child, a resync and a
status refresh of one InferenceService never run at the same time."""
from __future__ import annotations

import logging
import threading
import time

import kopf
import pytest

from kubeinfer.operator import handlers
from kubeinfer.operator.locks import ObjectLocks
from kubeinfer.operator.reconcile import LwsDiscovery
from kubeinfer.operator.status_follower import StatusFollower
from tests.operator.helpers import FakeApi, inference_service, make_settings


class OverlapApi(FakeApi):
    """Counts how many threads are inside a call at once (each call takes a little time)."""

    def __init__(self):
        super().__init__()
        self._inside, self.most = 0, 0
        self._guard = threading.Lock()

    def request(self, *args, **kwargs):
        with self._guard:
            self._inside += 1
            self.most = max(self.most, self._inside)
        try:
            time.sleep(0.002)
            return super().request(*args, **kwargs)
        finally:
            with self._guard:
                self._inside -= 1


def test_hold_serializes_one_key_and_not_others():
    locks, order = ObjectLocks(), []

    def work(key: str, tag: str) -> None:
        with locks.hold("ns", key):
            order.append(f"{tag}+")
            time.sleep(0.05)
            order.append(f"{tag}-")

    threads = [threading.Thread(target=work, args=("a", "1")), threading.Thread(target=work, args=("a", "2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (["1+", "1-", "2+", "2-"], ["2+", "2-", "1+", "1-"])
    with locks.hold("ns", "a"), locks.hold("ns", "b"):   # different objects: independent
        pass
    locks.forget("ns", "a")
    assert len(locks) == 1


@pytest.mark.parametrize("locked", [True, False])
def test_restore_resync_and_refresh_of_one_object_never_overlap(monkeypatch, locked):
    monkeypatch.setattr(kopf, "event", lambda *a, **k: None)
    api = OverlapApi()
    body = inference_service()
    api.put_object(body)
    locks = ObjectLocks()
    if not locked:   # the same handlers with a lock that locks nothing: they do overlap
        monkeypatch.setattr(ObjectLocks, "hold", lambda self, ns, name: _NoLock())
    registry = handlers.build_registry(make_settings(), api=api, locks=locks)
    fns = {h.id: h.fn for h in (*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers(),
                                *registry._watching.get_all_handlers())}
    follower = StatusFollower(api, make_settings(), LwsDiscovery("off"), locks=locks)
    child = {"kind": "Service", "metadata": {"name": "llm", "namespace": "ns",
                                             "labels": {"kubeinfer.io/inferenceservice": "llm"}}}
    jobs = [lambda: fns["child-services"](type="DELETED", body=child, logger=logging.getLogger()),
            lambda: fns["resync"](body=inference_service(), patch=kopf.Patch(), logger=logging.getLogger(),
                                  retry=0),
            lambda: follower.refresh("ns", "llm")] * 3
    threads = [threading.Thread(target=_quiet, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (api.most == 1) is locked, api.most


def _quiet(job) -> None:
    try:
        job()
    except kopf.TemporaryError:
        pass   # unlocked, they trip over each other (409s): what the lock prevents


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
