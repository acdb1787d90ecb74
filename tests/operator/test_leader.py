"""leader.py: the pure claim rule (table) and LeaderElector against an in-memory Lease API."""
from __future__ import annotations

import asyncio

import pytest

from kubeinfer.operator.apply import ApiError
from kubeinfer.operator.leader import LeaderElector, claim, micro_time
from tests.operator.helpers import FakeApi

NOW = "2025-01-01T00:00:00.000000Z"
HELD = {"holderIdentity": "b", "leaseDurationSeconds": 15, "acquireTime": "x", "renewTime": "y",
        "leaseTransitions": 2}

CLAIMS = [
    # (current, expired, want: None or (holder, acquireTime, leaseTransitions))
    ("no lease yet", None, False, ("a", NOW, 0)),
    ("ours: renewed", {**HELD, "holderIdentity": "a"}, False, ("a", "x", 2)),
    ("another's, valid", HELD, False, None),
    ("another's, expired", HELD, True, ("a", NOW, 3)),
    ("released (empty holder)", {**HELD, "holderIdentity": ""}, False, ("a", NOW, 3)),
]


@pytest.mark.parametrize("case,current,expired,want", CLAIMS, ids=[c[0] for c in CLAIMS])
def test_claim(case, current, expired, want):
    got = claim(current, "a", NOW, 15, expired)
    if want is None:
        assert got is None
    else:
        assert (got["holderIdentity"], got["acquireTime"], got["leaseTransitions"]) == want
        assert got["renewTime"] == NOW and got["leaseDurationSeconds"] == 15


def test_micro_time():
    assert micro_time(0) == "1970-01-01T00:00:00.000000Z"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def elector(api, name, clock):
    return LeaderElector(api, "ops", name, lease_seconds=15, renew_seconds=5, clock=clock, wall=lambda: clock.t)


def test_one_leader_and_a_takeover_only_after_the_lease_ran_out():
    api, clock = FakeApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire() and a.is_leader
    assert not b.try_acquire()
    clock.t += 10
    assert a.try_acquire() and not b.try_acquire()   # renewed: b saw the record change
    clock.t += 14
    assert not b.try_acquire()                        # 14 s of silence < 15
    clock.t += 2
    assert b.try_acquire()                            # a is silent for 16 s: b takes over
    lease = api.objects[("Lease", "ops", "kubeinfer-operator")]["spec"]
    assert (lease["holderIdentity"], lease["leaseTransitions"]) == ("b", 1)
    assert not a.try_acquire()                        # a sees b's fresh record


def test_a_lost_race_is_not_an_error():
    api, clock = FakeApi(), Clock()
    a = elector(api, "a", clock)
    api.fail[("POST", "Lease")] = ApiError(409, "AlreadyExists", "leases \"kubeinfer-operator\" already exists")
    assert a.try_acquire() is False and not a.is_leader


def test_release_lets_a_standby_take_over_at_once():
    api, clock = FakeApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire() and not b.try_acquire()
    a.release()
    assert not a.is_leader and b.try_acquire()


def test_keep_stops_the_operator_when_renewing_fails_too_long():
    api, clock = FakeApi(), Clock()
    a = LeaderElector(api, "ops", "a", lease_seconds=3, renew_seconds=0.01, clock=clock, wall=lambda: clock.t)
    assert a.try_acquire()

    class Down(Exception):
        pass

    def failing(*args, **kwargs):
        clock.t += 1   # each failed round takes a second of our clock
        raise ApiError(503, "ServiceUnavailable", "apiserver down")

    api.request = failing
    stop = asyncio.Event()
    asyncio.run(asyncio.wait_for(a.keep(stop), 10))
    assert stop.is_set() and a.lost and not a.is_leader
    assert clock.t - 100 <= 3   # gone before another replica could have taken over
