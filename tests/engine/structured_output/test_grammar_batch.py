"""The step's matcher work: GrammarBatch's batch path (xgrammar's BatchGrammarMatcher) gives
the rows and verdicts of the per-row path, and the manager feeds each output token to its matcher
exactly once and in order, whichever of the runner (async scheduling) or the scheduler comes first."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.structured_output.bitmask import allocate_bitmask, unpack_bitmask
from kubeinfer.engine.structured_output.grammar_batch import GrammarBatch
from kubeinfer.engine.structured_output.manager import StructuredOutputManager
from kubeinfer.engine.structured_output.matcher import StructuredOutputMatcher
from kubeinfer.engine.structured_output.params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "pattern": "^[a-z ]*$"},
                                           "n": {"type": "integer"}},
          "required": ["text", "n"], "additionalProperties": False}


class _Reasoning:
    """Reasoning ends at token END (the matcher's ReasoningEndDetector protocol)."""

    END = 7

    def is_reasoning_end(self, token_ids):
        return bool(token_ids) and token_ids[-1] == self.END


@pytest.fixture(scope="module")
def compiled(compiler):
    return compiler.compile(StructuredOutputsParams(json=SCHEMA))


def _walk(compiled, tokenizer, batch: GrammarBatch, steps=12, rows=10, seed=0):
    """Rows of matchers (some still reasoning) take random allowed tokens, a few disallowed ones;
    the masks and verdicts of every step."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    matchers = [StructuredOutputMatcher(compiled, _Reasoning() if r % 4 == 0 else None)
                for r in range(rows)]
    masks, verdicts = [], []
    mask = allocate_bitmask(rows, vocab)
    for step in range(steps):
        batch.fill(matchers, mask)
        masks.append(mask.clone())
        allowed = unpack_bitmask(mask, vocab)
        tokens = torch.multinomial(allowed.float(), 1, generator=gen).squeeze(1).tolist()
        if step == 1:
            tokens[0] = _Reasoning.END  # row 0 starts its grammar
        if step == 5:
            tokens[3] = int((~allowed[3]).nonzero()[0])  # refused: the matcher stays put
        verdicts.append(batch.accept(matchers, tokens))
    return masks, verdicts, [m.num_accepted_tokens for m in matchers]


def test_batch_path_matches_one_by_one(compiled, smollm2_tokenizer):
    one = _walk(compiled, smollm2_tokenizer, GrammarBatch(min_rows=1 << 30))
    batched = _walk(compiled, smollm2_tokenizer, GrammarBatch(max_threads=2, min_rows=1))
    # the accept in chunks of 2-4 rows on three threads
    chunked = _walk(compiled, smollm2_tokenizer,
                    GrammarBatch(max_threads=3, min_rows=1, min_chunk_rows=2))
    for other in (batched, chunked):
        assert all(torch.equal(a, b) for a, b in zip(one[0], other[0]))
        assert one[1:] == other[1:]
    assert not all(all(v) for v in one[1])  # the refused token was refused


@pytest.fixture
def manager(compiler, smollm2_tokenizer, compiled):
    m = StructuredOutputManager(smollm2_tokenizer, len(smollm2_tokenizer),
                                [smollm2_tokenizer.eos_token_id], max_num_seqs=4)
    m._compiler = compiler  # the session's: no second tokenizer table
    for req_id in ("a", "b"):
        m.submit(req_id, StructuredOutputsParams(json=SCHEMA))
        m._futures[req_id].result()
        assert m.take_ready(req_id, [1, 2, 3])
    yield m
    m._compiler = None  # the session's compiler stays; the mask thread (if any) goes
    m.shutdown()


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_each_token_reaches_its_matcher_once_and_in_order(manager, smollm2_tokenizer):
    first, second = _ids(smollm2_tokenizer, '{"n"')[:2]
    # the runner feeds step N's token to fill step N+1's mask ...
    manager.grammar_bitmask(["a", "b"], [("a", 0, first), ("b", 0, first), ("gone", 0, first)])
    assert manager.matchers["a"].num_accepted_tokens == 1
    # ... then the scheduler resolves step N: the same token again is no second accept
    assert manager.accept("a", first, 0) == (True, False)
    assert manager.matchers["a"].num_accepted_tokens == 1
    # a token two places ahead, or a different token at a taken place, is an engine bug
    with pytest.raises(RuntimeError, match="before token 1"):
        manager.accept("a", second, 2)
    with pytest.raises(RuntimeError, match="its grammar took"):
        manager.accept("a", second, 0)
    assert manager.accept("a", second, 1)[0] and manager.matchers["a"].num_accepted_tokens == 2
    # a token refused once stays refused (the request fails at its resolve) without raising later
    assert manager.accept("b", smollm2_tokenizer.eos_token_id, 1) == (False, False)
    assert manager.accept_known([("b", 1, smollm2_tokenizer.eos_token_id), ("b", 2, first)]) \
        == [False, False]
    manager.free("b")
    assert manager.accept("b", first, 5) == (True, False)  # freed: nothing to constrain


def test_the_mask_job_runs_beside_the_engine_thread(manager, smollm2_tokenizer):
    """start_grammar_bitmask returns while the matchers still work; whatever asks the matchers
    next (the scheduler's resolve) waits for the job's accept, so each token is taken once."""
    import threading

    first = _ids(smollm2_tokenizer, '{"n"')[0]
    gate, original = threading.Event(), manager.batch.accept

    def gated_accept(matchers, tokens):
        assert gate.wait(30), "the test never opened the gate"
        return original(matchers, tokens)
    manager.batch.accept = gated_accept
    manager.mask_thread = True
    job = manager.start_grammar_bitmask(["a", "b"], [("a", 0, first), ("b", 0, first)])
    assert not job.done()  # held at the gate: the caller got its Future first
    assert manager.has_matcher("a")  # bookkeeping that needs no matcher position goes on
    got = []
    resolver = threading.Thread(target=lambda: got.append(manager.accept_resolved(
        [("a", 0, first), ("b", 0, first)])))
    resolver.start()
    gate.set()
    resolver.join(30)
    mask = job.result(30)
    assert got == [[(True, False), (True, False)]]
    assert [manager.matchers[r].num_accepted_tokens for r in "ab"] == [1, 1]
    # the rows are those after the token: '{' was taken, so '{' is no longer allowed
    allowed = unpack_bitmask(mask, len(smollm2_tokenizer))
    assert not allowed[:, first].any() and allowed.any(dim=1).all()


def test_a_failing_mask_job_raises_on_the_engine_thread(manager, smollm2_tokenizer):
    first = _ids(smollm2_tokenizer, '{"n"')[0]

    def broken(matchers, tokens):
        raise RuntimeError("matcher broke")
    manager.batch.accept = broken
    manager.mask_thread = True
    job = manager.start_grammar_bitmask(["a"], [("a", 0, first)])
    with pytest.raises(RuntimeError, match="matcher broke"):
        job.result(30)
    with pytest.raises(RuntimeError, match="matcher broke"):  # and at the next matcher call
        manager.accept_resolved([("a", 0, first)])


def test_a_mask_thread_shortens_the_switch_interval_until_shutdown(manager, smollm2_tokenizer):
    """Its threads hand the GIL back and forth with the engine thread every step."""
    import sys

    from kubeinfer.engine.structured_output.manager import MASK_THREAD_SWITCH_INTERVAL

    before = sys.getswitchinterval()
    manager.mask_thread = True
    manager.start_grammar_bitmask(["a"], [("a", 0, _ids(smollm2_tokenizer, "{")[0])]).result(30)
    # (the interpreter keeps whole microseconds: compare within one)
    assert sys.getswitchinterval() <= MASK_THREAD_SWITCH_INTERVAL + 1e-6
    manager._compiler = None  # (the session's compiler stays up)
    manager.shutdown()
    assert sys.getswitchinterval() == pytest.approx(before, abs=1e-6)
