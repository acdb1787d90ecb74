"""The scheduler and the KV manager with images, no model: encoder runs listed in the step that
first needs an image, a chunk stopped before an image the encoder budget cannot take, outputs
freed once consumed (or on abort), one encoder run for an image two requests share, and block
hashes that tell two images apart."""
from kubeinfer.engine.config import SchedulerConfig
from kubeinfer.engine.kv_cache.manager import KVCacheManager
from kubeinfer.engine.multimodal.inputs import ImageFeature, PlaceholderRange
from kubeinfer.engine.outputs import ModelRunnerOutput
from kubeinfer.engine.request import Request, RequestStatus
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.scheduler import Scheduler

IMG = 99  # the placeholder token id


def make(budget=16, block_size=4, caching=True):
    kv = KVCacheManager(64, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8), kv, 256)


def req(rid, images: list[tuple[int, int, str]], n_prompt=24, max_tokens=2):
    """A prompt of n_prompt tokens with images at (offset, length, hash)."""
    ids = list(range(1, n_prompt + 1))
    features = []
    for offset, length, h in images:
        ids[offset:offset + length] = [IMG] * length
        features.append(ImageFeature(h, PlaceholderRange(offset, length)))
    return Request(rid, ids, SamplingParams(max_tokens=max_tokens), frozenset({0}),
                   mm_features=tuple(features))


def step(s):
    out = s.schedule()
    sampled = {rid: 7 for rid, n in out.num_scheduled_tokens.items()
               if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens}
    s.update(out, ModelRunnerOutput(sampled=sampled))
    return out


def test_encoder_runs_in_the_step_that_first_needs_the_image_and_is_freed_after():
    s = make(budget=8)
    s.add_request(req("a", [(6, 5, "h1")], n_prompt=20))
    out = step(s)  # [0, 8) reaches into the image [6, 11)
    assert out.num_scheduled_tokens == {"a": 8} and out.scheduled_encoder_inputs == {"a": [0]}
    out = step(s)  # [8, 16) finishes it: no second run
    assert out.scheduled_encoder_inputs == {} and out.freed_encoder_hashes == []
    out = step(s)  # the next step tells the runner to drop it
    assert out.freed_encoder_hashes == ["h1"]
    assert s.encoder_cache.num_free == 8


def test_chunk_stops_before_an_image_the_encoder_budget_cannot_take():
    s = make(budget=12)
    # two images of 6 and 8 rows: both overlap [0, 12), but 14 rows > the budget of 12
    s.add_request(req("a", [(2, 6, "h1"), (9, 8, "h2")], n_prompt=24))
    out = step(s)
    assert out.num_scheduled_tokens == {"a": 9}  # stopped just before the second image
    assert out.scheduled_encoder_inputs == {"a": [0]}
    out = step(s)
    assert out.scheduled_encoder_inputs == {"a": [1]}


def test_two_requests_with_one_image_share_one_encoder_run():
    s = make(budget=64, caching=False)
    s.add_request(req("a", [(2, 6, "same")]))
    s.add_request(req("b", [(2, 6, "same")]))
    out = step(s)
    assert out.scheduled_encoder_inputs == {"a": [0]}  # b reads a's output
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    while s.has_unfinished_requests():
        step(s)
    assert s.encoder_cache.num_free == 64  # freed once both had computed the image


def test_abort_frees_the_image():
    s = make(budget=8)
    s.add_request(req("a", [(4, 6, "h1")]))
    step(s)
    assert s.encoder_cache.num_free == 2
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert s.encoder_cache.num_free == 8 and s.encoder_cache.take_freed() == ["h1"]


def test_block_hashes_fold_in_image_hashes():
    kv = KVCacheManager(64, 4, True)
    a, b = req("a", [(5, 4, "h1")], n_prompt=16), req("b", [(5, 4, "h2")], n_prompt=16)
    ha, hb = kv._block_hashes(a, 16), kv._block_hashes(b, 16)
    assert ha[0] == hb[0]  # text-only block [0, 4): shared
    assert ha[1] != hb[1] and ha[2] != hb[2]  # blocks holding image positions: apart
    assert ha[3] != hb[3]  # and everything after, by the chain
    text = Request("t", list(a.prompt_token_ids), SamplingParams(max_tokens=1), frozenset())
    assert kv._block_hashes(text, 16)[0] == ha[0]  # a text-only block keeps its text-only hash


def test_prefix_cache_reuses_text_but_not_another_image():
    s = make(budget=64, block_size=4)
    s.add_request(req("a", [(9, 4, "h1")], n_prompt=20, max_tokens=1))
    step(s)
    s.add_request(req("b", [(9, 4, "h2")], n_prompt=20, max_tokens=1))
    out = step(s)
    # b found the two text-only blocks [0, 8) and nothing from block [8, 12) on
    assert out.scheduled_new_reqs[0].num_computed_tokens == 8
    assert s.kv.take_prefix_cache_stats()[1] == 8
