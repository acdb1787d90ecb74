"""`GrammarWorker`: the structured-output matchers in a process of their own.

Advancing 256 matchers by a token and filling their bitmask rows is C++ that releases the GIL,
but its threads still need the GIL between calls, and in the engine's process the engine thread
runs Python (scheduling, detokenizing, preparing the next step) for most of every step. On an
H100 host an accept of 107 rows took 1.8 ms alone and 6-120 ms beside a busy Python thread
(benchmarks/bench_accept_scaling.py), so on the mask thread the constrained run could only
overlap the fill, not the accept. In a child process the matchers have a GIL of their own: the
engine thread sends the step's tokens and rows down a pipe and goes on; the child accepts and
fills while it does. vLLM gets the same from its process split (the grammar masks are made in
the scheduler's process, the forward pass in the worker's).

The child holds its own StructuredOutputManager (no compiler: grammars come compiled, as
xgrammar's JSON, once per grammar) and writes the rows into a shared-memory bitmask that the
parent reads; where a GPU is, the parent pins that memory (cudaHostRegister) so the rows' copy
to the device does not wait for the stream. The child never touches CUDA.

Messages, parent -> child (those marked -> are answered, in order, by ("done", accepted,
terminated, accept seconds, fill seconds) or ("error", message)):
- ("add", req_id, key, grammar_json | None, prompt_token_ids, reasoning): a matcher for the
  request over grammar `key` (its JSON is sent with the first request that uses it);
- ("free", req_id); ("drop", key): forget a grammar (its matchers keep their own reference);
- ("job", known, req_ids) ->: the matchers take `known` (request id, output index, token), then
  bitmask row i <- the allowed tokens of req_ids[i];
- ("accept", known) ->: the matchers take `known`;
- ("stop",).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from kubeinfer.engine.cpu_threads import available_cpus
from kubeinfer.engine.structured_output.bitmask import allocate_bitmask

logger = logging.getLogger(__name__)

Known = list[tuple[str, int, int]]

# grammars the parent remembers having sent; the oldest is dropped on both sides past this
MAX_GRAMMARS = 256
# The child's accept and fill threads, at most (half the CPUs otherwise). On an H100 host (16
# CPUs) 107 rows' accept took 4.8 ms on one thread, 1.8 on four, 2.0 on eight alone
# (benchmarks/bench_accept_scaling.py); in the engine's constrained run eight threads beat four
# and two (docs/benchmarks.md).
DEFAULT_THREADS = 8


@contextlib.contextmanager
def without_main_module() -> Iterator[None]:
    """While it is open, a spawned child does not re-run the parent's main script. Spawn imports
    it in the child unless the main module has neither a spec nor a file; the worker needs none
    of it (its loop is this package's), and an offline script without an
    `if __name__ == "__main__":` guard would build a second engine there."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__spec__", "__file__") if hasattr(main, k)}
    try:
        if "__spec__" in saved:
            main.__spec__ = None
        if "__file__" in saved:
            del main.__file__
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def pin_host_memory(owner: object, tensor: torch.Tensor) -> weakref.finalize | None:
    """Register `tensor`'s (shared) memory with CUDA until the returned finalizer is called or
    `owner` is collected, whichever comes first. Unregistering before the memory is unmapped
    matters: a registration that outlives its mapping stays in the driver, so a later mapping at
    the same address fails to register ("already mapped"), and a copy from it could read the old
    pages. None where registering failed (the copy then waits for the stream: still correct);
    the failed call's error is cleared so that no later CUDA call reports it."""
    cudart = torch.cuda.cudart()
    nbytes = tensor.numel() * tensor.element_size()
    err = cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    if int(err) != 0:
        logger.warning("the grammar worker's bitmask could not be pinned (%s); its copies to the "
                       "GPU wait for the stream", cudart.cudaGetErrorString(err))
        clear_cuda_error()
        return None
    # the finalizer holds the tensor, so its memory stays mapped until the registration is gone
    return weakref.finalize(owner, _unpin, cudart, tensor)


def _unpin(cudart: Any, tensor: torch.Tensor) -> None:
    cudart.cudaHostUnregister(tensor.data_ptr())


def clear_cuda_error() -> None:
    """Reset CUDA's last error after a failed runtime call we handled ourselves: torch checks it
    after every kernel launch and would otherwise raise it from an unrelated op (torch's cudart
    bindings have no cudaGetLastError; a launch check reads and resets it)."""
    try:
        torch.empty(1, device="cuda").fill_(1)
    except RuntimeError:
        pass


class GrammarWorkerError(RuntimeError):
    """The worker process failed or exited: the engine cannot mask tokens without it."""


class GrammarWorker:
    """The parent's end. Args:
        serve: the child's loop, (pipe end, tokenizer_info_json, bitmask, threads) -> None: a module-level
            function (manager.serve_worker: the child runs a manager of its own).
        tokenizer_info_json: the compiler's xgrammar TokenizerInfo, serialized.
        max_rows: the most bitmask rows one job fills.
        vocab_size: the logits' width.
        pin_memory: register the shared bitmask with CUDA (a GPU engine).
        threads: the child's accept and fill threads (None: DEFAULT_THREADS, or fewer CPUs).
    """

    def __init__(self, serve: Callable, tokenizer_info_json: str, max_rows: int,
                 vocab_size: int, pin_memory: bool = False, threads: int | None = None):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")  # the parent may hold CUDA: never fork it
        self.bitmask = allocate_bitmask(max_rows, vocab_size).share_memory_()
        self._unpin = (pin_host_memory(self, self.bitmask)
                       if pin_memory and torch.cuda.is_available() else None)
        self._conn, child = ctx.Pipe()
        threads = threads or max(1, min(DEFAULT_THREADS, available_cpus() // 2))
        self._proc = ctx.Process(target=serve, args=(child, tokenizer_info_json, self.bitmask,
                                                     threads),
                                 name="kubeinfer-grammar", daemon=True)
        with without_main_module():
            self._proc.start()
        child.close()
        self._grammars: OrderedDict[int, tuple[str, Any]] = OrderedDict()  # id -> (key, grammar)
        self._next_key = 0
        self.owed = 0  # replies the parent has yet to read

    # ---- messages ------------------------------------------------------------------------------
    def add(self, req_id: str, compiled: Any, prompt_token_ids: Sequence[int],
            reasoning: Any) -> None:
        entry = self._grammars.get(id(compiled))
        payload = None
        if entry is None:
            key = str(self._next_key)
            self._next_key += 1
            payload = compiled.serialize_json()
            self._grammars[id(compiled)] = (key, compiled)  # (holding it keeps its id unique)
            if len(self._grammars) > MAX_GRAMMARS:
                old_key, _ = self._grammars.popitem(last=False)[1]
                self._send(("drop", old_key))
        else:
            key = entry[0]
            self._grammars.move_to_end(id(compiled))
        # the prompt matters only to a reasoning parser (a prompt may end the reasoning)
        prompt = list(prompt_token_ids) if reasoning is not None else []
        self._send(("add", req_id, key, payload, prompt, reasoning))

    def free(self, req_id: str) -> None:
        self._send(("free", req_id))

    def job(self, known: Known, req_ids: Sequence[str]) -> None:
        self._send(("job", known, list(req_ids)))
        self.owed += 1

    def accept(self, known: Known) -> None:
        self._send(("accept", known))
        self.owed += 1

    def reply(self) -> tuple[list[bool], list[bool], float, float]:
        """The next answer: (accepted, terminated, accept seconds, fill seconds), one entry of
        each list per token sent. Waits for it (the GIL is released while it waits)."""
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            raise GrammarWorkerError(self._died()) from None
        self.owed -= 1
        if msg[0] == "error":
            raise GrammarWorkerError(f"the structured-output worker failed: {msg[1]}")
        return msg[1], msg[2], msg[3], msg[4]

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (EOFError, OSError):
            raise GrammarWorkerError(self._died()) from None

    def _died(self) -> str:
        self._proc.join(1)
        return (f"the structured-output worker process exited (exit code {self._proc.exitcode}); "
                "constrained requests cannot be masked without it, so the engine stops (the "
                "pod restarts)")

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("stop",))
            except (EOFError, OSError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._conn.close()
        if self._unpin is not None:
            self._unpin()  # (a finalizer runs once: collecting the worker later does nothing)

