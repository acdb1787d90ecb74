"""The scheduler with pipeline stages: up to N steps in flight, each request in one of them at
most, the running requests spread over the steps, and each request's last sampled token handed to
the ranks in the next plan. A fake model samples 100 + the output index; no tensors."""
from collections import deque

import pytest

from kubeinfer.engine.in_flight import InFlightRequests
from kubeinfer.engine.outputs import ModelRunnerOutput
from kubeinfer.engine.scheduler import Scheduler
from tests.engine.test_scheduler import make, req


def make_pp(depth, **kw):
    s = make(**kw)
    return Scheduler(s.config, s.kv, s.max_model_len, pipeline_depth=depth)


def run_queue(s, depth):
    """The engine's batch queue: launch while fewer than `depth` steps are in flight, read the
    oldest when full or when nothing could be launched. Returns each launch's (its requests, the
    requests of the steps in flight then) and the plans."""
    queue, launches, plans = deque(), [], []
    for _ in range(500):
        if not (s.has_unfinished_requests() or queue):
            return launches, plans
        launched = False
        if len(queue) < depth:
            out = s.schedule()
            if not out.is_empty:
                launches.append((set(out.num_scheduled_tokens),
                                 [set(o.num_scheduled_tokens) for o, _ in queue]))
                plans.append(out)
                queue.append((out, s.advance(out)))
                launched = True
        if queue and (not launched or len(queue) >= depth):
            _, pending = queue.popleft()
            s.resolve(pending, ModelRunnerOutput(sampled={r.req_id: 100 + i for r, i in pending}))
    raise AssertionError("the requests did not finish")


def test_steps_in_flight_take_disjoint_requests_and_fill_the_queue():
    s = make_pp(2)
    reqs = [req(f"r{i}", 5 + i, max_tokens=6) for i in range(6)]
    for r in reqs:
        s.add_request(r)
    launches, plans = run_queue(s, 2)
    for mine, others in launches:
        assert all(not (mine & o) for o in others)
    assert max(len(others) for _, others in launches) == 1  # two steps in flight at a time
    # the six requests go three a step: each stage gets half of them
    assert {len(mine) for mine, _ in launches[:4]} == {3}
    assert all(r.output_token_ids == list(range(100, 106)) for r in reqs)
    assert s.kv.num_free_blocks == s.kv.num_blocks
    # each plan names the last sampled token of every running request it schedules again
    resolved = [plan.resolved_output_tokens for plan in plans]
    assert all(tok == 100 + idx for r in resolved for idx, tok in r.values())
    assert sum(len(r) for r in resolved) == 6 * 5  # every output but the last is handed on


def test_preemption_with_steps_in_flight_keeps_every_token():
    # 8 blocks of 4 tokens for four requests that grow to 16 tokens each: preemptions
    s = make_pp(2, num_blocks=8, block_size=4, max_model_len=32, caching=False)
    reqs = [req(f"r{i}", 7, max_tokens=9) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    launches, _ = run_queue(s, 2)
    assert sum(r.num_preemptions for r in reqs) > 0
    for mine, others in launches:
        assert all(not (mine & o) for o in others)
    assert all(r.output_token_ids == list(range(100, 109)) for r in reqs)
    assert s.kv.num_free_blocks == 8


def test_one_stage_keeps_its_plan():
    s = make_pp(1)
    for i in range(4):
        s.add_request(req(f"r{i}", 4))
    out = s.schedule()
    assert len(out.num_scheduled_tokens) == 4
    s.update(out, ModelRunnerOutput(sampled={r: 7 for r in out.num_scheduled_tokens}))
    assert s.schedule().resolved_output_tokens == {}


def test_a_request_scheduled_twice_in_flight_is_a_bug_not_a_wrong_token():
    in_flight = InFlightRequests(2)
    in_flight.launched(["a", "b"])
    with pytest.raises(RuntimeError, match=r"\['b'\] were scheduled while a step with them"):
        in_flight.launched(["b", "c"])
    in_flight.landed()
    in_flight.launched(["b"])
    assert "b" in in_flight and "a" not in in_flight
    assert [InFlightRequests(3).step_limit(n, 8) for n in (1, 3, 7, 40)] == [1, 1, 3, 8]
