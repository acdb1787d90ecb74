"""Bidirectional spans with no model: the rules of attention_spans.py (never end a chunk inside a
span, never hit half of one in the prefix cache, span keys in block hashes, per-token bounds) and
the scheduler and KV manager that apply them."""
import numpy as np
import pytest

from kubeinfer.engine.attention_spans import (block_span_keys, check_span_budget,
                                              round_cache_hit, stop_before_span, token_bounds)
from kubeinfer.engine.config import SchedulerConfig
from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.kv_cache.manager import KVCacheManager
from kubeinfer.engine.outputs import ModelRunnerOutput
from kubeinfer.engine.request import Request
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.scheduler import Scheduler

SPANS = [(3, 9), (12, 14)]


@pytest.mark.parametrize("start,num_new,want", [
    (0, 3, 3), (0, 5, 3), (0, 9, 9), (0, 10, 10), (0, 13, 12), (0, 14, 14),
    (3, 4, 0), (3, 6, 6), (9, 4, 3), (12, 1, 0), (14, 5, 5)])
def test_stop_before_span(start, num_new, want):
    assert stop_before_span(SPANS, start, num_new) == want


@pytest.mark.parametrize("num_cached,want", [(0, 0), (3, 3), (4, 3), (8, 3), (9, 9), (12, 12),
                                             (13, 12), (16, 16)])
def test_round_cache_hit_drops_half_spans(num_cached, want):
    # block size 1 shows the rule itself; 4 rounds to whole blocks below the span's start
    assert round_cache_hit(SPANS, num_cached, 1) == want
    assert round_cache_hit([(6, 20)], 16, 4) == 4
    # rounding down may land inside an earlier span: rounded again
    assert round_cache_hit([(1, 6), (7, 12)], 8, 4) == 0


def test_block_span_keys_and_budget():
    assert block_span_keys(SPANS, 0, 4) == (("bidir", 3, 9),)
    assert block_span_keys(SPANS, 8, 12) == (("bidir", 3, 9),)
    assert block_span_keys(SPANS, 9, 12) == ()
    assert block_span_keys(SPANS, 8, 16) == (("bidir", 3, 9), ("bidir", 12, 14))
    check_span_budget(SPANS, 6)
    with pytest.raises(RequestError, match="--max-num-batched-tokens") as info:
        check_span_budget(SPANS, 5)
    assert "6 tokens" in str(info.value)


def test_token_bounds():
    lo, hi = token_bounds([SPANS, []], [2, 20], [8, 1])
    assert lo.tolist() == [2, 3, 3, 3, 3, 3, 3, 9, 20]
    assert hi.tolist() == [2, 8, 8, 8, 8, 8, 8, 9, 20]
    assert lo.dtype == hi.dtype == np.int32


def make(budget, block_size=4, caching=True):
    kv = KVCacheManager(64, block_size, caching)
    return kv, Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8), kv, 256)


def req(rid, spans, n_prompt=16):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=2),
                   frozenset({0}), bidir_spans=tuple(spans))


def step(s):
    out = s.schedule()
    sampled = {rid: 7 for rid, n in out.num_scheduled_tokens.items()
               if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens}
    s.update(out, ModelRunnerOutput(sampled=sampled))
    return out


def test_scheduler_never_ends_a_chunk_inside_a_span():
    _, s = make(budget=7)
    s.add_request(req("a", SPANS))
    chunks = [step(s).num_scheduled_tokens["a"] for _ in range(3)]
    # [0, 7) would cut (3, 9): [0, 3); then [3, 10) holds it whole; then the rest, (12, 14) too
    assert chunks == [3, 7, 6]
    _, s = make(budget=7)
    s.add_request(req("b", [(5, 12)]))  # [0, 7) would cut it, and [5, 12) is a whole budget
    assert [step(s).num_scheduled_tokens["b"] for _ in range(3)] == [5, 7, 4]


def test_prefix_cache_never_hits_half_a_span_and_keys_blocks_by_span():
    kv, s = make(budget=32)
    s.add_request(req("a", [(2, 14)]))
    step(s)
    s.finish_request("a", s.requests["a"].status.FINISHED_ABORTED)
    # the same tokens and span: every cached block ends inside (2, 14) up to block 3 -> no hit
    _, num_cached = kv.get_computed_blocks(req("b", [(2, 14)]))
    assert num_cached == 0
    # the same tokens with no span: the blocks' hashes differ (the span is in them)
    _, num_cached = kv.get_computed_blocks(req("c", []))
    assert num_cached == 0
    # a span wholly inside the hit: the blocks that cover it whole are reused
    kv2, s2 = make(budget=32)
    s2.add_request(req("d", [(1, 3)]))
    step(s2)
    s2.finish_request("d", s2.requests["d"].status.FINISHED_ABORTED)
    _, num_cached = kv2.get_computed_blocks(req("e", [(1, 3)]))
    assert num_cached == 12


@pytest.mark.parametrize("arch", ["Gemma3ForConditionalGeneration",
                                  "PaliGemmaForConditionalGeneration"])
def test_vision_language_models_are_refused_on_the_transformers_backend(arch):
    # the backend would run their spans causally: a clear ConfigError instead
    from types import SimpleNamespace

    from kubeinfer.engine.errors import ConfigError
    from kubeinfer.engine.models import registry

    config = SimpleNamespace(architectures=[arch], model_type="x")
    with pytest.raises(ConfigError, match="--model-impl auto or native"):
        registry.get_model_class(config, "generate", "transformers")


def test_gemma3_spans_are_the_runs_of_image_tokens():
    # pan-and-scan: one image's placeholder holds several crops with text markers between them
    from kubeinfer.engine.models.gemma_vlm import (Gemma3ForConditionalGeneration,
                                                   PaliGemmaForConditionalGeneration)
    from kubeinfer.engine.multimodal.inputs import ImageFeature, PlaceholderRange

    crops = ImageFeature("h", PlaceholderRange(5, 7, (True, True, False, False, True, True, True)))
    whole = ImageFeature("g", PlaceholderRange(20, 3))
    assert Gemma3ForConditionalGeneration.bidirectional_spans(30, (crops, whole)) == [
        (5, 7), (9, 12), (20, 23)]
    assert PaliGemmaForConditionalGeneration.bidirectional_spans(30, (whole,)) == [(0, 30)]
