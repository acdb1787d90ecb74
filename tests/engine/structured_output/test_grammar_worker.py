"""The matchers in the grammar worker process (grammar_worker.py, remote_matchers.py) give the
rows and verdicts of the in-process manager, answer the resolve of a masked non-stop token
without waiting for the worker, and a dead worker is a clear error, not a hang."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from kubeinfer.engine.structured_output.bitmask import unpack_bitmask
from kubeinfer.engine.structured_output.grammar_worker import GrammarWorkerError
from kubeinfer.engine.structured_output.manager import StructuredOutputManager
from kubeinfer.engine.structured_output.params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "pattern": "^[a-z ]*$"},
                                           "n": {"type": "integer"}},
          "required": ["text", "n"], "additionalProperties": False}
REQS = ("a", "b", "c")


def _manager(tokenizer, compiler, worker: bool) -> StructuredOutputManager:
    m = StructuredOutputManager(tokenizer, len(tokenizer), [tokenizer.eos_token_id],
                                max_num_seqs=4)
    m.use_worker = worker
    if not worker:
        m._compiler = compiler  # the session's: no second tokenizer table
    for req_id in REQS:
        m.submit(req_id, StructuredOutputsParams(json=SCHEMA))
        m._futures[req_id].result()
        assert m.take_ready(req_id, [1, 2, 3])
    return m


@pytest.fixture(scope="module")
def worker_manager(smollm2_tokenizer):
    m = _manager(smollm2_tokenizer, None, worker=True)
    assert m.remote is not None and m.has_matcher("a")
    yield m
    m.shutdown()


def test_the_worker_gives_the_in_process_rows_and_verdicts(worker_manager, smollm2_tokenizer,
                                                           compiler):
    """Both managers walk the same random allowed tokens; each step's rows and the scheduler's
    verdicts match, a request freed midway included."""
    local = _manager(smollm2_tokenizer, compiler, worker=False)
    remote = worker_manager
    gen = torch.Generator().manual_seed(0)
    vocab = len(smollm2_tokenizer)
    live, known = list(REQS), []
    for step in range(8):
        if step == 4:  # a request ends: both forget it
            live.remove("b")
            for m in (local, remote):
                m.free("b")
        want = local.grammar_bitmask(live, known).clone()
        got = remote.start_grammar_bitmask(live, known).result().clone()
        assert torch.equal(got, want)
        assert remote.accept_resolved(known) == local.accept_resolved(known)
        allowed = unpack_bitmask(want, vocab).float()
        tokens = torch.multinomial(allowed, 1, generator=gen).squeeze(1).tolist()
        counts = {r: local.matchers[r].num_accepted_tokens for r in live}
        known = [(r, counts[r], t) for r, t in zip(live, tokens)]
    assert remote.accept_seconds > 0 and remote.num_fills == 8


def test_a_masked_token_resolves_without_waiting_and_a_stop_token_waits(worker_manager,
                                                                         smollm2_tokenizer):
    m = worker_manager
    for req_id in ("d", "e", "f"):  # fresh requests (the module's manager is shared)
        m.submit(req_id, StructuredOutputsParams(json=SCHEMA))
        m._futures[req_id].result()
        assert m.take_ready(req_id, [1, 2, 3])
    first = smollm2_tokenizer.encode("{", add_special_tokens=False)[0]
    eos = smollm2_tokenizer.eos_token_id
    m.start_grammar_bitmask(["d", "e"], [])  # rows of the first step
    m.remote.sync()
    m.start_grammar_bitmask(["d", "e"], [("d", 0, first), ("e", 0, first)])
    assert m.accept_resolved([("d", 0, first), ("e", 0, first)]) == [(True, False)] * 2
    assert m.remote.worker.owed == 1  # answered before the worker did
    m.remote.sync()
    # EOS right after "{" is refused: a stop token is always asked of the worker
    assert m.accept_resolved([("f", 0, eos)]) == [(False, False)]
    assert m.remote.worker.owed == 0


def test_a_masked_stop_token_ends_the_grammar_without_waiting(worker_manager, smollm2_tokenizer,
                                                              caplog):
    """EOS sampled under its mask (allowed only where the grammar may end) ends it: answered
    at once, and the worker's verdict agrees (nothing logged)."""
    m = worker_manager
    m.submit("g", StructuredOutputsParams(json=SCHEMA))
    m._futures["g"].result()
    assert m.take_ready("g", [1, 2, 3])
    # (the compiled grammar takes "n" before "text")
    tokens = smollm2_tokenizer.encode('{"n":1,"text":"ab"}', add_special_tokens=False)
    m.start_grammar_bitmask(["g"], [])
    for i, t in enumerate(tokens + [smollm2_tokenizer.eos_token_id]):
        m.start_grammar_bitmask(["g"], [("g", i, t)])
        end = i == len(tokens)
        assert m.accept_resolved([("g", i, t)]) == [(True, end)]
        assert m.remote.worker.owed == 1  # answered before the worker did
        m.remote.sync()
    assert "engine bug" not in caplog.text


def test_a_last_token_outside_the_job_resolves_without_waiting(worker_manager,
                                                               smollm2_tokenizer):
    """A request that ends with this token (length) is in no later step, so the job in flight
    did not take its token: answered at once rather than after the job and an accept round trip;
    a token outside the job that does not end its request still goes to the worker."""
    m = worker_manager
    for req_id in ("h", "i"):
        m.submit(req_id, StructuredOutputsParams(json=SCHEMA))
        m._futures[req_id].result()
        assert m.take_ready(req_id, [1, 2, 3])
    first = smollm2_tokenizer.encode("{", add_special_tokens=False)[0]
    m.start_grammar_bitmask(["h", "i"], [])
    m.remote.sync()
    m.start_grammar_bitmask(["i"], [("i", 0, first)])  # "h" ends: not in the next step's rows
    assert m.accept_resolved([("h", 0, first), ("i", 0, first)], [True, False]) == [
        (True, False)] * 2
    assert m.remote.worker.owed == 1  # nothing waited for the job in flight
    m.remote.sync()
    # the same token of a request that goes on is asked of the worker (it waits, and answers)
    m.start_grammar_bitmask(["i"], [])
    assert m.accept_resolved([("h", 0, first)], [False]) == [(True, False)]
    assert m.remote.worker.owed == 0
    m.free("h")
    m.free("i")


def test_the_worker_does_not_re_run_the_main_script():
    """An offline script without a main guard must not build a second engine in the worker."""
    import sys
    from multiprocessing import spawn

    from kubeinfer.engine.structured_output.grammar_worker import without_main_module

    main = sys.modules["__main__"]
    before = (getattr(main, "__spec__", None), getattr(main, "__file__", None))
    with without_main_module():
        data = spawn.get_preparation_data("kubeinfer-grammar")
    assert "init_main_from_path" not in data and "init_main_from_name" not in data
    assert (getattr(main, "__spec__", None), getattr(main, "__file__", None)) == before


def test_a_dead_worker_is_a_clear_error(smollm2_tokenizer):
    """A worker of its own: the module's stays alive for the other tests, which pytest-xdist's
    work stealing may run after this one."""
    m = _manager(smollm2_tokenizer, None, worker=True)
    try:
        m.start_grammar_bitmask(["a"], []).result()  # it is up
        os.kill(m.remote.worker._proc.pid, signal.SIGKILL)
        m.remote.worker._proc.join(10)
        with pytest.raises(GrammarWorkerError, match="worker process exited"):
            m.start_grammar_bitmask(["a"], []).result()
    finally:
        m.remote.worker.close()


class _FakeCudart:
    """torch.cuda.cudart()'s two calls, recorded (no GPU here)."""

    def __init__(self, register_error: int = 0):
        self.register_error = register_error
        self.registered: list[int] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.registered.append(ptr)
        return self.register_error

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0

    def cudaGetErrorString(self, err):
        return f"error {err}"


def test_pinned_bitmask_is_unregistered_when_its_owner_goes(monkeypatch):
    """A worker dropped without close() still unregisters its shared bitmask before the memory is
    unmapped (a stale registration made the next engine's pinning fail on an H100), once."""
    import gc

    from kubeinfer.engine.structured_output import grammar_worker

    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)

    class Owner:
        pass

    owner, bitmask = Owner(), torch.zeros(4, 8, dtype=torch.int32).share_memory_()
    unpin = grammar_worker.pin_host_memory(owner, bitmask)
    assert unpin is not None and fake.registered == [bitmask.data_ptr()]
    del owner
    gc.collect()
    assert fake.unregistered == [bitmask.data_ptr()]
    unpin()  # close() after collection: nothing more
    assert fake.unregistered == [bitmask.data_ptr()]


def test_a_failed_pin_clears_the_cuda_error(monkeypatch):
    """Registering may fail ("already mapped"): the copy then waits for the stream, and the error
    is cleared, or torch would raise it from the next kernel launch (seen in the GPU tests)."""
    from kubeinfer.engine.structured_output import grammar_worker

    fake, cleared = _FakeCudart(register_error=712), []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(grammar_worker, "clear_cuda_error", lambda: cleared.append(True))
    assert grammar_worker.pin_host_memory(object(), torch.zeros(4, dtype=torch.int32)) is None
    assert cleared == [True] and fake.unregistered == []
