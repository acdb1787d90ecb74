"""Scheduler policy with a fake 'model' that samples fixed tokens: no tensors anywhere."""
from kubeinfer.engine.config import SchedulerConfig
from kubeinfer.engine.kv_cache.manager import KVCacheManager
from kubeinfer.engine.outputs import ModelRunnerOutput
from kubeinfer.engine.request import Request, RequestStatus
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.scheduler import Scheduler


def make(num_blocks=64, block_size=4, budget=64, max_seqs=8, max_model_len=256, caching=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), kv,
                     max_model_len)


def req(rid, n_prompt, max_tokens=4, **kw):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=frozenset({0}))


def step(s, token=7):
    out = s.schedule()
    sampled = {rid: token for rid, n in out.num_scheduled_tokens.items()
               if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens}
    return out, s.update(out, ModelRunnerOutput(sampled=sampled))


def scheduled(out):
    return list(out.num_scheduled_tokens.items())


def test_budget_chunks_long_prompt_and_decodes_join():
    s = make(budget=16)
    s.add_request(req("a", 40))
    out, ups = step(s)
    assert scheduled(out) == [("a", 16)] and ups == []
    s.add_request(req("b", 3))
    out, _ = step(s)
    assert scheduled(out) == [("a", 16)]  # budget spent on a first
    out, ups = step(s)
    assert scheduled(out) == [("a", 8), ("b", 3)]
    assert {u.req.req_id for u in ups} == {"a", "b"}
    out, _ = step(s)
    assert scheduled(out) == [("a", 1), ("b", 1)]


def test_max_num_seqs_caps_running():
    s = make(max_seqs=2)
    for i in range(4):
        s.add_request(req(str(i), 4))
    out, _ = step(s)
    assert len(out.num_scheduled_tokens) == 2 and len(s.waiting) == 2


def test_finishes_on_max_tokens_eos_and_stop_ids():
    s = make()
    s.add_request(req("len", 4, max_tokens=2))
    s.add_request(req("eos", 4, max_tokens=10))
    s.add_request(req("stop", 4, max_tokens=10, stop_token_ids=[5]))
    out = s.schedule()
    ups = s.update(out, ModelRunnerOutput(sampled={"len": 3, "eos": 0, "stop": 5}))
    done = {u.req.req_id: u.req.status for u in ups if u.finished}
    assert done == {"eos": RequestStatus.FINISHED_STOPPED, "stop": RequestStatus.FINISHED_STOPPED}
    out = s.schedule()
    ups = s.update(out, ModelRunnerOutput(sampled={"len": 3}))
    assert ups[0].finished and ups[0].req.status == RequestStatus.FINISHED_LENGTH
    assert not s.has_unfinished_requests()
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_ignore_eos_and_min_tokens():
    s = make()
    s.add_request(req("a", 4, max_tokens=3, ignore_eos=True))
    s.add_request(req("b", 4, max_tokens=5, min_tokens=2))
    for _ in range(2):
        out = s.schedule()
        ups = s.update(out, ModelRunnerOutput(sampled=dict.fromkeys(out.num_scheduled_tokens, 0)))
    assert {u.req.req_id: u.finished for u in ups} == {"a": False, "b": False}
    out = s.schedule()
    ups = s.update(out, ModelRunnerOutput(sampled=dict.fromkeys(out.num_scheduled_tokens, 0)))
    assert all(u.finished for u in ups)


def test_stops_at_max_model_len():
    s = make(max_model_len=6)
    s.add_request(req("a", 4, max_tokens=100))
    for _ in range(2):
        out, ups = step(s)
    assert ups[0].finished and ups[0].req.status == RequestStatus.FINISHED_LENGTH


def test_preemption_newest_first_and_pool_whole_after():
    # 6 blocks of 4 tokens: three 7-token requests need 2 blocks each, then growth forces preemption
    s = make(num_blocks=6, block_size=4, max_model_len=24)
    reqs = [req(rid, 7, max_tokens=9) for rid in "abc"]
    for r in reqs:
        s.add_request(r)
    preempted = []
    finished = set()
    for _ in range(100):
        if not s.has_unfinished_requests():
            break
        out, ups = step(s)
        preempted += out.preempted_req_ids
        finished |= {u.req.req_id for u in ups if u.finished}
    assert finished == {"a", "b", "c"}
    assert preempted and preempted[0] == "c"  # newest first
    assert s.kv.num_free_blocks == 6
    assert all(len(r.output_token_ids) == 9 for r in reqs)


def test_preempted_request_resumes_with_its_outputs():
    s = make(num_blocks=4, block_size=4, max_model_len=16, caching=False)
    a, b = req("a", 6, max_tokens=6), req("b", 6, max_tokens=6)
    s.add_request(a)
    s.add_request(b)
    while s.has_unfinished_requests():
        step(s)
    assert a.output_token_ids == [7] * 6 and b.output_token_ids == [7] * 6
    assert a.num_preemptions + b.num_preemptions > 0
    assert s.kv.num_free_blocks == 4


def test_abort_waiting_and_running_frees_blocks():
    s = make(num_blocks=8)
    s.add_request(req("a", 8))
    step(s)
    s.add_request(req("b", 8))
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    s.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert s.finish_request("zzz", RequestStatus.FINISHED_ABORTED) is None
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == 8


def test_prefix_cache_hit_skips_computed_tokens():
    s = make(block_size=4)
    s.add_request(req("a", 12))
    step(s)
    s.add_request(req("b", 12))
    out, _ = step(s)
    sched = out.num_scheduled_tokens
    assert sched["b"] == 4  # two blocks (8 tokens) were cached; last block recomputed
    assert s.requests["b"].num_cached_tokens == 8


def test_stats_report_queue_and_usage():
    s = make(max_seqs=1)
    s.add_request(req("a", 4))
    s.add_request(req("b", 4))
    step(s)
    st = s.make_stats()
    assert (st.num_running_reqs, st.num_waiting_reqs) == (1, 1) and 0 < st.kv_cache_usage <= 1


def make_priority(**kw):
    s = make(**kw)
    s.config = SchedulerConfig(max_num_batched_tokens=s.config.max_num_batched_tokens,
                               max_num_seqs=s.config.max_num_seqs, scheduling_policy="priority")
    return s


def prio_req(rid, n_prompt, priority, arrival, **kw):
    r = req(rid, n_prompt, **kw)
    r.priority, r.arrival_time = priority, arrival
    return r


def test_priority_policy_admits_lower_values_first_then_by_arrival():
    s = make_priority(max_seqs=2)
    for rid, prio, t in (("late-low", 5, 1.0), ("urgent", -1, 3.0), ("early-mid", 0, 0.5),
                         ("later-mid", 0, 2.0)):
        s.add_request(prio_req(rid, 4, prio, t))
    assert [r.req_id for r in s.waiting] == ["urgent", "early-mid", "later-mid", "late-low"]
    out, _ = step(s)
    assert list(out.num_scheduled_tokens) == ["urgent", "early-mid"]


def test_fcfs_ignores_priority_values():
    s = make(max_seqs=2)
    for rid, prio, t in (("a", 5, 1.0), ("b", -1, 2.0)):
        s.add_request(prio_req(rid, 4, prio, t))
    assert [r.req_id for r in s.waiting] == ["a", "b"]


def test_priority_preempts_the_lowest_even_when_it_was_scheduled_earlier_in_the_step():
    s = make_priority(num_blocks=5, block_size=4, caching=False)
    s.add_request(prio_req("low", 8, 9, 0.0, max_tokens=8))
    step(s)                                   # low: 8 prompt tokens, 2 blocks
    s.add_request(prio_req("high", 8, 0, 1.0, max_tokens=8))
    out, _ = step(s)                          # low decodes (3rd block), high prefills (2 blocks)
    assert list(out.num_scheduled_tokens) == ["low", "high"] and s.kv.num_free_blocks == 0
    out, _ = step(s)  # low fits its 3rd block; high needs a 3rd: low is preempted after all
    assert out.preempted_req_ids == ["low"]
    assert scheduled(out) == [("high", 1)]
    assert [r.req_id for r in s.running] == ["high"] and [r.req_id for r in s.waiting] == ["low"]
    assert s.kv.num_free_blocks == 2  # low's 3 blocks back, one of them now high's


def test_fcfs_preempts_the_newest_in_the_same_situation():
    s = make(num_blocks=5, block_size=4, caching=False)
    s.add_request(prio_req("first", 8, 9, 0.0, max_tokens=8))
    step(s)
    s.add_request(prio_req("second", 8, 0, 1.0, max_tokens=8))
    step(s)
    out, _ = step(s)
    assert out.preempted_req_ids == ["second"]
    assert scheduled(out) == [("first", 1)]


def test_bad_policy_is_a_config_error():
    import pytest

    from kubeinfer.engine.errors import ConfigError
    with pytest.raises(ConfigError, match="--scheduling-policy must be fcfs or priority"):
        SchedulerConfig(scheduling_policy="lottery")


def test_output_is_plain_data_new_requests_whole_once_then_the_diff():
    import pickle

    s = make(num_blocks=16, block_size=4, budget=8)
    s.add_request(req("a", 10, max_tokens=3))
    out, _ = step(s)  # a: 8 of 10 prompt tokens, 2 blocks
    assert [n.req_id for n in out.scheduled_new_reqs] == ["a"] and not out.scheduled_cached_reqs.req_ids
    new = out.scheduled_new_reqs[0]
    assert (new.prompt_token_ids, new.block_ids, new.num_computed_tokens) == (list(range(1, 11)),
                                                                             [0, 1], 0)
    out, _ = step(s)  # a: the last 2 prompt tokens, a 3rd block
    cached = out.scheduled_cached_reqs
    assert not out.scheduled_new_reqs
    assert (cached.req_ids, cached.new_block_ids, cached.num_computed_tokens) == (["a"], [[2]], [8])
    assert pickle.loads(pickle.dumps(out)) == out  # a step can cross a pipe
    s.add_request(req("b", 3))
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    out, _ = step(s)
    assert out.finished_req_ids == {"a"} and [n.req_id for n in out.scheduled_new_reqs] == ["b"]
    assert not any(isinstance(v, Request) for v in vars(out).values())


def test_a_preempted_request_comes_back_whole_with_its_outputs():
    s = make(num_blocks=4, block_size=4, max_model_len=16, caching=False)
    a, b = req("a", 6, max_tokens=6), req("b", 6, max_tokens=6)
    s.add_request(a)
    s.add_request(b)
    preempted, resumed = [], []
    while s.has_unfinished_requests():
        out, _ = step(s)
        preempted += out.preempted_req_ids
        resumed += [(n.req_id, n.output_token_ids) for n in out.scheduled_new_reqs if n.output_token_ids]
    assert preempted and resumed and resumed[0][0] == preempted[0]
    assert all(ids and set(ids) == {7} for _, ids in resumed)
