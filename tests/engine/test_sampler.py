"""Sampler: each transform against a hand-computed expectation, draws against their distribution."""
from __future__ import annotations

import math
import re

import pytest
import torch

from kubeinfer.engine.request import Request
from kubeinfer.engine.sampler import Sampler, SamplingMetadata, apply_top_k_top_p
from kubeinfer.engine.sampling_params import SamplingParams, SamplingParamsError

EOS = 3


def make_req(req_id="r", prompt=(1, 2), output=(), eos=(EOS,), **params) -> Request:
    req = Request(req_id, list(prompt), SamplingParams(**params), eos_token_ids=frozenset(eos))
    for t in output:
        req.append_output_token(t)
    return req


def sample(logits, reqs, sampler=None):
    sampler = sampler or Sampler()
    return sampler(logits, SamplingMetadata.build(reqs, logits.device))


def empirical(logits_row, num_draws, **params):
    reqs = [make_req(f"r{i}", **params) for i in range(num_draws)]
    out = sample(logits_row.expand(num_draws, -1).clone(), reqs)
    return torch.bincount(torch.tensor(out.sampled_token_ids), minlength=logits_row.numel()).float()


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token of probability 0"
    return (((counts - expected) ** 2)[keep] / expected[keep]).sum().item(), int(keep.sum()) - 1


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def test_greedy_equals_argmax_with_ties_to_lowest_index():
    logits = torch.randn(7, 50)
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1.0  # a tie
    out = sample(logits, [make_req(f"r{i}", temperature=0.0) for i in range(7)])
    assert out.sampled_token_ids == logits.argmax(dim=-1).tolist()
    assert out.sampled_token_ids[3] == 10
    assert out.logprobs is None


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    counts = empirical(logits, 20_000, temperature=0.7)
    stat, dof = chi_square(counts, torch.softmax(logits / 0.7, dim=-1))
    assert stat < 24.3, f"chi2={stat:.1f} with {dof} dof (p < 0.001)"


def test_top_k_restricts_to_k_best_and_keeps_their_ratio():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.5, 0.0, 2.0, 1.0, -2.0])
    counts = empirical(logits, 20_000, top_k=3)
    assert set(counts.nonzero().flatten().tolist()) == {1, 3, 5}
    kept = torch.full_like(logits, float("-inf"))
    kept[[1, 3, 5]] = logits[[1, 3, 5]]
    stat, _ = chi_square(counts, torch.softmax(kept, dim=-1))
    assert stat < 13.8  # 2 dof, p < 0.001


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.20])
    logits = probs.log().unsqueeze(0).repeat(3, 1)
    top_p = torch.tensor([0.6, 0.7, 0.86])
    out = apply_top_k_top_p(logits, None, top_p)
    finite = [set(row.isfinite().nonzero().flatten().tolist()) for row in out]
    # 0.40 + 0.25 = 0.65 >= 0.6; 0.65 < 0.7 needs 0.20 too; 0.85 < 0.86 needs 0.10 too.
    assert finite == [{1, 3}, {1, 3, 4}, {1, 2, 3, 4}]
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])
    counts = empirical(probs.log(), 5_000, top_p=0.6)
    assert set(counts.nonzero().flatten().tolist()) == {1, 3}


def test_top_k_and_top_p_together_and_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 2)
    out = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.5]))
    assert out[0].isfinite().tolist() == [True, True, False, False]
    assert out[1].isfinite().tolist() == [True, False, False, False]  # p(4.0) = 0.64 >= 0.5


def test_min_p_drops_tokens_below_fraction_of_top():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    counts = empirical(probs.log(), 5_000, min_p=0.2)  # threshold 0.1
    assert set(counts.nonzero().flatten().tolist()) == {0, 1, 2}


@pytest.mark.parametrize("penalty, expected", [
    # logits [2, -1, 0.5, 1, 3]; prompt {1, 2}, output [2, 4, 4]
    (dict(repetition_penalty=2.0), [2.0, -2.0, 0.25, 1.0, 1.5]),
    (dict(frequency_penalty=0.5), [2.0, -1.0, 0.0, 1.0, 2.0]),
    (dict(presence_penalty=0.5), [2.0, -1.0, 0.0, 1.0, 2.5]),
    (dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
     [2.0, -2.0, 0.25 - 0.5 - 0.25, 1.0, 1.5 - 1.0 - 0.25]),
])
def test_penalties_change_logits_as_computed_by_hand(penalty, expected):
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 3.0]])
    req = make_req(prompt=(1, 2), output=(2, 4, 4), eos=(), temperature=0.0, **penalty)
    meta = SamplingMetadata.build([req], "cpu")
    from kubeinfer.engine.sampler import apply_penalties

    assert torch.allclose(apply_penalties(logits, meta)[0], torch.tensor(expected))
    # greedy rows see the penalized logits: 4 is the argmax before, 0 after any penalty here
    assert Sampler()(logits, meta).sampled_token_ids == [int(torch.tensor(expected).argmax())]


def test_penalties_only_touch_rows_that_ask():
    logits = torch.randn(3, 20)
    reqs = [make_req("a", prompt=range(10), output=(5, 5), temperature=0.0),
            make_req("b", prompt=range(10), output=(5, 5), temperature=0.0, repetition_penalty=1.3),
            make_req("c", output=(7,), temperature=0.0, presence_penalty=1.0)]
    from kubeinfer.engine.sampler import apply_penalties

    meta = SamplingMetadata.build(reqs, "cpu")
    out = apply_penalties(logits, meta)
    assert torch.equal(out[0], logits[0])
    changed = (out[1] != logits[1]).nonzero().flatten().tolist()
    assert changed == [i for i in range(10) if logits[1, i] != 0]
    assert (out[2] != logits[2]).nonzero().flatten().tolist() == [7]


def seeded_tokens(req_id, seed, neighbors, steps, logits_row):
    """Sample `steps` tokens for one seeded request placed between unseeded neighbors."""
    sampler = Sampler()
    tokens = []
    for _ in range(steps):
        reqs = ([make_req(f"n{i}") for i in range(neighbors)] + [make_req(req_id, seed=seed)]
                + [make_req("m", seed=99, temperature=0.5)])
        logits = torch.randn(len(reqs), logits_row.numel())
        logits[neighbors] = logits_row
        tokens.append(sampler(logits, SamplingMetadata.build(reqs, "cpu")).sampled_token_ids[neighbors])
    return tokens


def test_seeded_rows_reproducible_and_independent_of_neighbors():
    row = torch.randn(100)
    a = seeded_tokens("s", 42, neighbors=0, steps=30, logits_row=row)
    b = seeded_tokens("s", 42, neighbors=5, steps=30, logits_row=row)
    assert a == b
    assert len(set(a)) > 1  # the stream continues across steps rather than restarting
    assert seeded_tokens("s", 43, neighbors=0, steps=30, logits_row=row) != a


def test_free_restarts_a_seeded_stream():
    sampler = Sampler()
    logits = torch.randn(1, 100)
    draw = lambda: sampler(logits, SamplingMetadata.build([make_req("s", seed=7)], "cpu")).sampled_token_ids
    first = [draw() for _ in range(10)]
    sampler.free("s")
    assert [draw() for _ in range(10)] == first


def test_logprobs_are_raw_log_softmax_with_per_row_top_n():
    logits = torch.randn(4, 30)
    reqs = [make_req("a", temperature=0.0, logprobs=5),
            make_req("b", temperature=0.8, logprobs=2, presence_penalty=1.0, output=(1,)),
            make_req("c", temperature=0.0),
            make_req("d", temperature=0.0, logprobs=0)]
    out = sample(logits, reqs)
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for row, n in [(0, 5), (1, 2), (3, 0)]:
        token = out.sampled_token_ids[row]
        lp, top = out.logprobs[row]
        assert lp == pytest.approx(ref[row, token].item(), abs=1e-6)
        assert [t for t, _ in top] == ref[row].topk(n).indices.tolist()
        assert [v for _, v in top] == pytest.approx(ref[row].topk(n).values.tolist(), abs=1e-6)
        assert all(a >= b for (_, a), (_, b) in zip(top, top[1:]))
        assert all(isinstance(t, int) for t, _ in top)
    assert math.isclose(out.logprobs[0][0], out.logprobs[0][1][0][1], abs_tol=1e-6)  # greedy = top-1


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(3, 10)
    logits[:, EOS] = 10.0
    logits[:, 7] = 9.0
    logits[:, 5] = 8.0
    reqs = [make_req("a", output=(1,), temperature=0.0, min_tokens=2, stop_token_ids=[7]),
            make_req("b", output=(1, 1), temperature=0.0, min_tokens=2, stop_token_ids=[7]),
            make_req("c", temperature=0.0, min_tokens=2, ignore_eos=True)]
    assert sample(logits, reqs).sampled_token_ids == [5, EOS, EOS]
    # sampled rows too: EOS and 7 are never drawn while masked
    reqs = [make_req(f"r{i}", min_tokens=1, stop_token_ids=[7, 10_000]) for i in range(500)]
    assert not {EOS, 7} & set(sample(logits[:1].expand(500, -1), reqs).sampled_token_ids)


def test_mixed_batch_of_greedy_and_sampled_rows():
    logits = torch.randn(6, 40)
    logits[1::2, 0] = 50.0  # sampled rows: token 0 is near certain
    reqs = [make_req(f"r{i}", temperature=0.0 if i % 2 == 0 else 1.0, top_k=5 if i == 3 else 0,
                     top_p=0.9 if i == 5 else 1.0) for i in range(6)]
    out = sample(logits, reqs)
    assert out.sampled_token_ids[0::2] == logits[0::2].argmax(dim=-1).tolist()
    assert out.sampled_token_ids[1::2] == [0, 0, 0]


def test_metadata_flags_skip_unused_work():
    meta = SamplingMetadata.build([make_req("a", temperature=0.0, top_k=5), make_req("b", temperature=0.0)], "cpu")
    assert meta.all_greedy and not meta.all_random
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.presence_penalty is None and meta.stop_mask_rows is None and meta.max_num_logprobs is None
    meta = SamplingMetadata.build([make_req("a", top_p=0.5, seed=1), make_req("b", frequency_penalty=1.0)], "cpu")
    assert meta.all_random and meta.top_p is not None and meta.top_k is None
    assert meta.presence_penalty is not None and meta.prompt_token_ids is None
    assert meta.seeded_rows == [(0, "a", 1)]


def test_empty_batch():
    assert sample(torch.zeros(0, 10), []).sampled_token_ids == []


def test_prompt_logprobs_rank_ties_and_per_request_top_k():
    from kubeinfer.engine.sampler import prompt_logprobs, unpack_prompt_logprobs

    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    logits[1, 4] = logits[1, 7] = logits[1].max() + 1.0  # a tie for the best token
    targets = torch.tensor([2, 7, 0, 9, 10])
    packed = prompt_logprobs(logits, targets, k=3)
    assert packed.shape == (5, 2 + 2 * 3) and packed.dtype == torch.float64
    ref = logits.log_softmax(dim=-1)
    # rows 0-2 belong to a request that asked for 3, rows 3-4 to one that asked for 0
    reqs = [("a", 3, 4, 3), ("b", 0, 0, 2)]
    out = unpack_prompt_logprobs(packed.tolist(), reqs)
    assert [len(out["a"][1]), out["a"][0], len(out["b"][1]), out["b"][0]] == [3, 4, 2, 0]
    rows = out["a"][1] + out["b"][1]
    for i, (lp, rank, top) in enumerate(rows):
        assert lp == pytest.approx(ref[i, targets[i]].item(), abs=1e-6)
        assert rank == int((ref[i] >= ref[i, targets[i]]).sum())
        k = 3 if i < 3 else 0
        assert len(top) == k
        assert [v for _, v in top] == pytest.approx(ref[i].topk(k).values.tolist(), abs=1e-6)
        if i != 1:  # the tied row may list the two best in either order
            assert [t for t, _ in top] == ref[i].topk(k).indices.tolist()
    assert rows[1][1] == 2  # tied for best: both count, as vLLM ranks ties


def test_logit_bias_moves_greedy_and_draws_but_not_raw_logprobs():
    logits = torch.randn(3, 50)
    top = logits.argmax(dim=-1).tolist()
    reqs = [make_req("a", temperature=0.0, logit_bias={7: 100.0}, logprobs=1),
            make_req("b", temperature=0.0, logit_bias={top[1]: -100.0}),
            make_req("c", temperature=0.0)]  # no bias: unchanged
    out = sample(logits.clone(), reqs)
    assert out.sampled_token_ids[0] == 7
    assert out.sampled_token_ids[1] != top[1]
    assert out.sampled_token_ids[1] == logits[1].topk(2).indices[1].item()
    assert out.sampled_token_ids[2] == top[2]
    # logprobs stay those of the raw model distribution (vLLM's raw_logprobs)
    assert out.logprobs[0][0] == pytest.approx(logits[0].log_softmax(-1)[7].item(), abs=1e-5)
    drawn = empirical(torch.zeros(20), 500, temperature=1.0, logit_bias={4: 100.0, 9: 100.0})
    assert drawn[4] + drawn[9] == 500 and drawn[4] > 150 and drawn[9] > 150


@pytest.mark.parametrize("bias,says", [({"1": 5.0}, "token ids"), ({-1: 5.0}, "token ids"),
                                       ({True: 1.0}, "token ids"), ({1: 101.0}, "[-100, 100]"),
                                       ({1: "x"}, "[-100, 100]")])
def test_logit_bias_bad_values(bias, says):
    with pytest.raises(SamplingParamsError, match=re.escape(says)) as e:
        SamplingParams(logit_bias=bias)
    assert e.value.param == "logit_bias"
