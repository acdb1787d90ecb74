"""SamplingParams bounds every number where it is made, so the offline API is as safe as the server."""
from __future__ import annotations

import math

import pytest

from kubeinfer.engine.sampling_params import (INT64_MAX, INT64_MIN, MAX_N, SamplingParams,
                                              SamplingParamsError)


@pytest.mark.parametrize("kw, param", [
    ({"seed": 2**64}, "seed"),
    ({"seed": -2**70}, "seed"),
    ({"seed": True}, "seed"),
    ({"top_k": 10**400}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"stop_token_ids": [2**63]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [False]}, "stop_token_ids"),
    ({"n": MAX_N + 1}, "n"),
    ({"n": 0}, "n"),
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"min_tokens": 2**40, "max_tokens": None}, "min_tokens"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"min_p": math.nan}, "min_p"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"presence_penalty": math.nan}, "presence_penalty"),
    ({"logit_bias": {5: math.nan}}, "logit_bias"),
    ({"logit_bias": {2**40: 1.0}}, "logit_bias"),
])
def test_out_of_range_numbers_name_their_field(kw, param):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kw)
    assert e.value.param == param
    assert param in str(e.value)
    assert len(str(e.value)) < 300  # a huge integer is described, not printed


def test_the_int64_seed_range_is_accepted_and_children_stay_in_it():
    for seed in (INT64_MIN, INT64_MAX):
        params = SamplingParams(seed=seed, n=3)
        children = [params.clone_for_child(i).seed for i in range(3)]
        assert all(INT64_MIN <= s <= INT64_MAX for s in children)
        assert len(set(children)) == 3


@pytest.mark.parametrize("kw, param", [
    ({"top_k": 101}, "top_k"),
    ({"stop_token_ids": [100]}, "stop_token_ids"),
    ({"logit_bias": {100: 1.0}}, "logit_bias"),
])
def test_vocabulary_bounds(kw, param):
    params = SamplingParams(**kw)
    with pytest.raises(SamplingParamsError) as e:
        params.check_vocab(100)
    assert e.value.param == param and "100" in str(e.value)


def test_values_inside_the_vocabulary_pass():
    SamplingParams(top_k=100, stop_token_ids=[99], logit_bias={0: 1.0}).check_vocab(100)


def test_an_integral_float_top_k_from_a_generation_config_is_an_int():
    assert SamplingParams(top_k=50.0).top_k == 50


def test_only_streamed_replies_ask_for_deltas():
    """The server asks the engine for deltas only when it streams them; a reply sent whole gets
    one final output per choice (its text decoded once)."""
    from kubeinfer.engine.sampling_params import RequestOutputKind
    from kubeinfer.engine.server.protocol import ChatCompletionRequest, CompletionRequest

    msgs = [{"role": "user", "content": "hi"}]
    for stream, kind in ((True, RequestOutputKind.DELTA), (False, RequestOutputKind.FINAL_ONLY)):
        assert ChatCompletionRequest(model="m", messages=msgs, stream=stream
                                     ).to_sampling_params().output_kind == kind
        assert CompletionRequest(model="m", prompt="hi", stream=stream
                                 ).to_sampling_params().output_kind == kind
