"""`StructuredOutputManager`: the engine's one owner of grammars, matchers and the step's bitmask.

The scheduler calls it (engine process, the driver's side): `submit(req)` when a constrained
request arrives (compiling starts on the compiler's threads), `take_ready(req)` while the request
waits (None: still compiling; raises RequestError when the constraint does not compile; else its
matcher is made), `accept_resolved([(req, index, token), ...])` for a step's resolved tokens, `free(req_id)` when it ends.
The driver's runner (sample_step.py) calls `start_grammar_bitmask(req_ids, known)` after launching
the forward, so the CPU advances the matchers and fills the rows while the device computes, and
applies them to the logits before sampling (`bitmask.apply_bitmask`). With `mask_thread` on, the
job runs on its own thread (xgrammar's C++ releases the GIL) while the engine's thread resolves
the previous step, and the runner takes the rows before it enqueues anything else. Every other call that reads or moves a matcher's position waits for
the job's accept half first (`_sync`), so the two threads never work on one matcher's position. Workers of other ranks never call it: only rank 0 samples.

Under async scheduling step N+1's mask is filled before the scheduler has resolved step N, so
`grammar_bitmask` first feeds the matchers step N's tokens (`known`), and the scheduler's `accept`
of the same token later finds it taken. Both go through `accept_known`, keyed by the token's output
index: a matcher takes output token i exactly once, and only after token i - 1; a token that
arrives twice must be the same token. Nothing takes an accepted token back: a preempted request
keeps its outputs (only its KV cache is recomputed), a stop string ends the request, and a token
sampled after a request's end is dropped before any matcher sees it (the matcher is freed first).

With `use_worker` (the default on a GPU under async scheduling) the matchers live in a grammar
worker process instead (grammar_worker.py; `remote` holds the parent's side, remote_matchers.py):
every call above is a message, and this module's `serve_worker` is the child's loop, a manager of
its own without a compiler.

The compiler (and xgrammar's tokenizer table, a second or so for a 50k vocabulary) is built on
first use, and the worker process with it, so an engine that never sees a constraint never pays
for either.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.structured_output.bitmask import allocate_bitmask
from kubeinfer.engine.structured_output.compiler import StructuredOutputCompiler
from kubeinfer.engine.structured_output.grammar_batch import GrammarBatch
from kubeinfer.engine.structured_output.grammar_worker import GrammarWorker
from kubeinfer.engine.structured_output.matcher import StructuredOutputMatcher
from kubeinfer.engine.structured_output.params import StructuredOutputsParams
from kubeinfer.engine.structured_output.remote_matchers import RemoteMatchers


logger = logging.getLogger(__name__)

# sys.setswitchinterval while a mask thread exists (seconds): see start_grammar_bitmask
MASK_THREAD_SWITCH_INTERVAL = 0.0002


class StructuredOutputManager:
    """Args:
        tokenizer: the engine's tokenizer (None: every constraint is refused with a RequestError).
        vocab_size: the logits' width.
        eos_token_ids: ids that end generation; allowed only where the grammar may end.
        max_num_seqs: the most rows one step's bitmask can need.
        reasoning: a reasoning parser (the constraint starts after its end tag), or None.
        pin_memory: a pinned bitmask buffer, so its copy to the GPU does not wait for the stream.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int],
                 max_num_seqs: int, reasoning: Any = None, pin_memory: bool = False):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.max_num_seqs = max_num_seqs
        self.reasoning = reasoning
        self.pin_memory = pin_memory
        self._compiler: StructuredOutputCompiler | None = None
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self.matchers: dict[str, StructuredOutputMatcher] = {}
        self._rejected: set[str] = set()  # a matcher refused one of their tokens
        self._bitmask: torch.Tensor | None = None
        self.batch = GrammarBatch()
        # True: the mask job runs on its own thread beside the engine's (xgrammar's C++ releases
        # the GIL). On by default where the buffer is pinned (a GPU under async scheduling): on an
        # H100 host (profile_bench_phases.py, 256 rows) the constrained run went 10,651 -> 12,379
        # out tok/s with it. Off on CPU: there the forward itself needs the cores, and a step
        # took 0.7-2 ms longer with it (profile_grammar_host.py).
        self.mask_thread = pin_memory
        # True: the matchers live in a child process (grammar_worker.py), made with the compiler.
        # On by default where the mask thread would be: there the engine thread's Python and the
        # matchers' threads take turns for one GIL, in a child they do not.
        self.use_worker = pin_memory
        self.worker_threads: int | None = None  # the worker's accept/fill threads (None: its default)
        self.remote: RemoteMatchers | None = None
        self._thread: ThreadPoolExecutor | None = None  # the mask job's (start_grammar_bitmask)
        # (known, results, where, Future of the accept half) of the job in flight, for _sync
        self._job_accept: tuple | None = None
        # host time spent on masks (advancing the matchers, then filling the rows) and the steps
        # that did (for `kubeinfer bench`)
        self.accept_seconds = 0.0
        self.fill_seconds = 0.0
        self.num_fills = 0

    @property
    def compiler(self) -> StructuredOutputCompiler:
        with self._lock:  # the server's threads and the engine's may both ask first
            if self._compiler is None:
                if self.tokenizer is None:
                    raise RequestError("structured outputs need the model's tokenizer, and this "
                                       "engine was started with --skip-tokenizer-init: leave the "
                                       "constraint out", "structured_outputs")
                self._compiler = StructuredOutputCompiler(self.tokenizer, self.vocab_size,
                                                          self.eos_token_ids)
                if self.use_worker:  # starts beside the first compile (a second or two)
                    self.start_worker()
            return self._compiler

    def start_worker(self) -> None:
        """Move the matchers of requests made from now on to a grammar worker process (once;
        the compiler's tokenizer table goes with it). Requests that already have a matcher keep
        it here."""
        if self.remote is not None:
            return
        info = self._compiler.tokenizer_info
        worker = GrammarWorker(serve_worker, info.serialize_json(), self.max_num_seqs,
                               self.vocab_size, pin_memory=self.pin_memory,
                               threads=self.worker_threads)
        self.remote = RemoteMatchers(worker, info.stop_token_ids, self,
                                     reasoning=self.reasoning is not None)

    def validate(self, params: StructuredOutputsParams) -> Future:
        """The compile Future of `params` (cached: the engine's own submit later is a hit)."""
        return self.compiler.submit(params)

    # ---- the scheduler's side ------------------------------------------------------------------
    def submit(self, req_id: str, params: StructuredOutputsParams) -> None:
        self._futures[req_id] = self.compiler.submit(params)

    def take_ready(self, req_id: str, prompt_token_ids: Sequence[int]) -> bool:
        """Whether the request's grammar is compiled (its matcher is then made). Raises the
        compile's RequestError (or any other failure, as a RequestError) when it did not compile."""
        if req_id in self.matchers or (self.remote is not None and req_id in self.remote.ids):
            return True
        future = self._futures[req_id]
        if not future.done():
            return False
        del self._futures[req_id]
        error = future.exception()
        if error is not None:
            if isinstance(error, RequestError):
                raise error
            raise RequestError(f"the constraint could not be compiled: {type(error).__name__}: "
                               f"{error}", "structured_outputs")
        if self.remote is not None:
            self.remote.add(req_id, future.result(), prompt_token_ids, self.reasoning)
        else:
            self.matchers[req_id] = StructuredOutputMatcher(future.result(), self.reasoning,
                                                            prompt_token_ids)
        return True

    def accept(self, req_id: str, token_id: int, index: int) -> tuple[bool, bool]:
        """(accepted, terminated) after the request's output token `index` (see accept_known)."""
        return self.accept_resolved(((req_id, index, token_id),))[0]

    def accept_resolved(self, resolved: Sequence[tuple[str, int, int]],
                        ending: Sequence[bool] | None = None) -> list[tuple[bool, bool]]:
        """(accepted, terminated) of each (request id, output index, token) after its matcher
        took it (see accept_known): the scheduler's one call per step. `ending` says which
        requests end with this token anyway (length, stop token). With the mask thread on it
        waits for the job's accept half: answering a masked token without waiting (only stop
        tokens can end a grammar) was measured slower on an H100 host, since the engine thread's
        Python then holds the GIL while the accept threads need it (docs/benchmarks.md). With
        the worker process it does not wait for tokens it can answer (remote_matchers.py)."""
        if self.remote is not None:
            return self.remote.accept_resolved(list(resolved), ending)
        accepted = self.accept_known(resolved)
        matchers = self.matchers
        return [(ok, m is not None and m.is_terminated())
                for ok, m in zip(accepted, (matchers.get(r) for r, _, _ in resolved))]

    def accept_known(self, known: Iterable[tuple[str, int, int]]) -> list[bool]:
        """Feed each (request id, output index, token) to the request's matcher, unless it already
        took output token `index`; whether each is (or was) accepted. Ids without a matcher (not
        constrained, or finished) are taken as accepted.

        Raises RuntimeError when a token comes out of order, or differs from the one the matcher
        took at that index: the engine's bookkeeping is broken, and going on would sample
        outside the grammar."""
        known = list(known)
        results, todo, tokens, where = self._plan(known)
        self._apply(known, results, where, self.batch.accept(todo, tokens))
        return results

    def _plan(self, known: list[tuple[str, int, int]]):
        """accept_known's checks (on the engine's thread): (results so far, matchers that take a
        new token, those tokens, their positions in `known`)."""
        self._sync()
        results = [True] * len(known)
        todo, tokens, where = [], [], []
        matchers = self.matchers
        for k, (req_id, index, token_id) in enumerate(known):
            matcher = matchers.get(req_id)
            if matcher is None:
                continue
            num = matcher.num_accepted_tokens
            if index < num:
                if matcher.accepted_token(index) != token_id:
                    raise RuntimeError(f"request {req_id}: output token {index} is {token_id} "
                                       f"now but its grammar took {matcher.accepted_token(index)}")
            elif index == num:
                todo.append(matcher)
                tokens.append(token_id)
                where.append(k)
            elif req_id not in self._rejected:
                raise RuntimeError(f"request {req_id}: output token {index} reached its grammar "
                                   f"before token {num}")
            else:
                results[k] = False
        return results, todo, tokens, where

    def _apply(self, known, results: list[bool], where: list[int], accepted: list[bool]) -> None:
        for k, ok in zip(where, accepted):
            results[k] = ok
            # the request fails at its resolve; later tokens must not raise (unless it ended
            # while the mask job ran: then there is nothing left to fail)
            if not ok and known[k][0] in self.matchers:
                self._rejected.add(known[k][0])

    def _sync(self) -> None:
        """Wait for the accept half of the mask job in flight (if any) and record its results:
        every other use of the matchers' positions comes after it."""
        if self._job_accept is not None:
            known, results, where, accepted = self._job_accept
            self._job_accept = None
            self._apply(known, results, where, accepted.result())

    def free(self, req_id: str) -> None:
        if self.remote is not None:
            self.remote.free(req_id)
        self.matchers.pop(req_id, None)
        self._rejected.discard(req_id)
        # never cancel the Future: the compiler shares it with every request of the same constraint
        self._futures.pop(req_id, None)

    def wait_for_any(self, timeout: float) -> None:
        """Block until a pending compile finishes (or `timeout` s): an engine with nothing else to
        do waits here instead of spinning its loop."""
        if self._futures:
            wait(list(self._futures.values()), timeout, return_when=FIRST_COMPLETED)

    def has_matcher(self, req_id: str) -> bool:
        return req_id in self.matchers or (self.remote is not None and req_id in self.remote.ids)

    # ---- the driver runner's side --------------------------------------------------------------
    def grammar_bitmask(self, req_ids: Sequence[str],
                        known: Iterable[tuple[str, int, int]] = ()) -> torch.Tensor:
        """Rows of allowed next tokens, one per request id (in that order), on the CPU, after the
        matchers of `req_ids` took the tokens of `known` (request id, output index, token) they
        had not seen yet: the previous step's, which the scheduler resolves later."""
        return self.start_grammar_bitmask(req_ids, known).result()

    def start_grammar_bitmask(self, req_ids: Sequence[str],
                              known: Iterable[tuple[str, int, int]] = ()) -> Future:
        """grammar_bitmask on the mask thread: a Future of the rows. The checks run here; the
        matchers' accept and fill run in xgrammar's C++, which releases the GIL, so the engine's
        thread goes on (resolving the previous step, scheduling the next) meanwhile. Until the
        accept half is done, every other matcher call here waits for it (`_sync`).

        The buffer is reused. Its last copy to the device was enqueued by an earlier step, which
        has finished by now: the runner reads the previous step's tokens (waiting for its event)
        before it asks for rows, and every older step was read before this one was launched; and
        the runner takes each Future's rows before it asks for the next. With the worker
        process the rows come from there (remote_matchers.RemoteRows)."""
        if self.remote is not None:
            return self.remote.start_rows(req_ids, known)
        if self._bitmask is None or self._bitmask.shape[0] < len(req_ids):
            self._bitmask = allocate_bitmask(max(self.max_num_seqs, len(req_ids)), self.vocab_size,
                                             pin_memory=self.pin_memory)
        wanted = set(req_ids)
        known = [k for k in known if k[0] in wanted]
        results, todo, tokens, where = self._plan(known)
        rows = [self.matchers[req_id] for req_id in req_ids]
        mask = self._bitmask[:len(req_ids)]
        accepted: Future = Future()
        self._job_accept = (known, results, where, accepted)
        if not self.mask_thread:
            done: Future = Future()
            done.set_result(self._mask_job(todo, tokens, accepted, rows, mask))
            return done
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
            # The job's threads need the GIL briefly between their C++ calls, while the engine
            # thread runs Python; at the interpreter's default switch interval (5 ms) each such
            # hand-off can wait that long (benchmarks/bench_accept_scaling.py: an accept of 107
            # rows beside a busy Python thread took 85-120 ms at 5 ms, 6-11 ms at 0.2 ms).
            self._switch_interval = sys.getswitchinterval()
            if self._switch_interval > MASK_THREAD_SWITCH_INTERVAL:
                sys.setswitchinterval(MASK_THREAD_SWITCH_INTERVAL)
        return self._thread.submit(self._mask_job, todo, tokens, accepted, rows, mask)

    def _mask_job(self, todo, tokens, accepted: Future, rows, mask: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            accepted.set_result(self.batch.accept(todo, tokens))
        except BaseException as e:  # the engine's thread raises it at its next _sync
            accepted.set_exception(e)
            raise
        filled = time.perf_counter()
        with torch.inference_mode():  # the buffer was made under the runner's (thread-local) mode
            self.batch.fill(rows, mask)
        self.accept_seconds += filled - start
        self.fill_seconds += time.perf_counter() - filled
        self.num_fills += 1
        return mask

    def shutdown(self) -> None:
        if self.remote is not None:
            self.remote.worker.close()
            self.remote = None
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            if self._switch_interval > MASK_THREAD_SWITCH_INTERVAL:
                sys.setswitchinterval(self._switch_interval)
            self._thread = None
        if self._compiler is not None:
            self._compiler.shutdown()


def serve_worker(conn, tokenizer_info_json: str, bitmask: torch.Tensor, threads: int) -> None:
    """The grammar worker process's loop (grammar_worker.py's messages): a manager of its own
    holds the matchers. An exception in a job is answered as an error and the loop goes on;
    the parent decides what it means."""
    import xgrammar as xgr

    torch.set_num_threads(1)
    info = xgr.TokenizerInfo.deserialize_json(tokenizer_info_json)
    manager = StructuredOutputManager(None, bitmask.shape[1] * 32, (), bitmask.shape[0])
    manager.batch = GrammarBatch(max_threads=threads)
    grammars: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        kind = msg[0]
        if kind == "stop":
            return
        try:
            if kind == "add":
                _, req_id, key, payload, prompt, reasoning = msg
                if payload is not None:
                    grammars[key] = xgr.CompiledGrammar.deserialize_json(payload, info)
                manager.matchers[req_id] = StructuredOutputMatcher(grammars[key], reasoning,
                                                                   prompt)
            elif kind == "free":
                manager.free(msg[1])
            elif kind == "drop":
                grammars.pop(msg[1], None)
            else:  # "job" or "accept"
                known = msg[1]
                start = time.perf_counter()
                accepted = manager.accept_known(known)
                terminated = [m is not None and m.is_terminated()
                              for m in (manager.matchers.get(r) for r, _, _ in known)]
                filled = time.perf_counter()
                if kind == "job":
                    req_ids = msg[2]
                    manager.batch.fill([manager.matchers[r] for r in req_ids],
                                       bitmask[:len(req_ids)])
                conn.send(("done", accepted, terminated, filled - start,
                           time.perf_counter() - filled))
        except Exception as e:  # noqa: BLE001 - answered; the parent raises it
            logger.exception("structured-output worker: %s failed", kind)
            if kind in ("job", "accept"):
                conn.send(("error", f"{type(e).__name__}: {e}"))
