"""asyncio front of the engine for the server.

The engine steps in one background thread (torch releases the GIL during kernels, so the event loop
keeps serving HTTP meanwhile). Requests and aborts reach it through a thread-safe queue; outputs come
back to each request's asyncio.Queue via call_soon_threadsafe.

Failures: a request the engine failed on alone (finish_reason "error") ends its stream with
`RequestFailedError`, whose message is safe to show; the rest go on. Anything else that escapes a
step leaves the engine in an unknown state, so the thread logs it, ends every open stream with
`EngineDeadError` and calls `on_fatal`, by default `exit_process`: the process exits non-zero and
Kubernetes restarts the pod, instead of a live process that answers 503 forever.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, cast

from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.engine_factory import make_engine
from kubeinfer.engine.errors import EngineDeadError, RequestError, RequestFailedError
from kubeinfer.engine.outputs import EmbeddingOutput, RequestOutput
from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.protocol import Engine, RunnerType
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.stats import StatLogger

if TYPE_CHECKING:
    from kubeinfer.engine.embedding_engine import EmbeddingEngine
    from kubeinfer.engine.llm_engine import LLMEngine
    from kubeinfer.engine.multimodal.inputs import MultiModalInputs

logger = logging.getLogger(__name__)

FATAL_GRACE_S = 2.0  # how long the event loop gets to hand the dead-engine errors out before exit


def exit_process(error: BaseException) -> None:
    """The default `AsyncLLM.on_fatal`: flush the logs and end the process with code 1 at once
    (no interpreter teardown: other threads may be stuck in a collective or a kernel)."""
    logging.shutdown()
    os._exit(1)


class AsyncLLM:
    """Drives any `Engine` (an `LLMEngine` or an `EmbeddingEngine`) from one background thread;
    `runner_type` says which. Implements `EngineClient` for the server."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.runner_type: RunnerType = engine.runner_type
        self.config: EngineConfig = engine.config
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.served_model_names = engine.config.model.served_names
        self.default_sampling = engine.default_sampling
        self.vocab_size = engine.vocab_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        # what the engine thread calls after an error it cannot pin on one request; tests
        # replace it
        self.on_fatal: Callable[[BaseException], None] = exit_process

    @classmethod
    def from_config(cls, config: EngineConfig, stat_loggers: list[StatLogger] | tuple = ()
                    ) -> "AsyncLLM":
        """Load the model and, for a generator, size the KV cache (blocking). Raises ConfigError
        for what a user can fix."""
        return cls(make_engine(config, stat_loggers))

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kubeinfer-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    async def shutdown(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.engine.shutdown()

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams | PoolingParams,
                       request_id: str, priority: int = 0, mm_inputs: MultiModalInputs | None = None
                       ) -> AsyncIterator[RequestOutput | EmbeddingOutput]:
        """Yield deltas for each of the params.n samples until all have finished. `mm_inputs`
        (from multimodal.MultiModalPreprocessor) brings a vision-language prompt's images.

        Raises RequestError before the first yield if the engine cannot take the request. Closing the
        iterator early (a client that went away) aborts the request.
        """
        if self._error is not None or self._loop is None:
            raise EngineDeadError("the engine is not running (it stopped on an internal error, or "
                                  "was never started); the server is restarting")
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        self.engine.validate_request(prompt_token_ids, params)
        if mm_inputs is not None:
            if self.runner_type != "generate":
                raise RequestError("images go to a generative vision-language model, not an "
                                   "embedding model", "messages")
            cast("LLMEngine", self.engine).validate_mm_inputs(mm_inputs)
        constraint = getattr(params, "structured_outputs", None)
        if constraint is not None:
            # compile before the first yield, so a bad schema is a 400 and not a failed stream;
            # the engine's own compile of it is then a cache hit
            await asyncio.wrap_future(self.engine.structured_output.validate(constraint))
        if priority:
            self.engine.validate_priority(priority)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        done = False
        try:
            self._inbox.put(("add", request_id, prompt_token_ids, params, priority, mm_inputs))
            remaining = params.n
            while remaining:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if getattr(item, "error", None) is not None:
                    raise item.error  # the request's own fault, e.g. a schema that does not compile
                if getattr(item, "finish_reason", None) == "error":
                    raise RequestFailedError(
                        f"the engine failed while processing request {request_id}; the error is "
                        "in the server log. Retrying may succeed.")
                if item.finished:
                    remaining -= 1
                yield item
            done = True
        finally:
            self._streams.pop(request_id, None)
            if not done:
                self._inbox.put(("abort", request_id))

    def prepare_embedding_input(self, prompt: str | list[int], params: PoolingParams,
                                truncate_prompt_tokens: int | None = None,
                                add_special_tokens: bool = True, label: str = "input") -> list[int]:
        """One embedding input (text or token ids) -> the token ids to encode, truncated as asked
        and checked against the model's limits; RequestError otherwise."""
        if self.runner_type != "pooling":
            raise RequestError(f"{self.config.model.model} is not an embedding model: use "
                               "/v1/completions or /v1/chat/completions", "model")
        engine = cast("EmbeddingEngine", self.engine)  # the pooling runner's engine
        return engine.prepare_input(prompt, params, truncate_prompt_tokens, add_special_tokens,
                                    label)

    async def encode(self, prompt_token_ids: list[int], params: PoolingParams,
                     request_id: str) -> EmbeddingOutput:
        """The embedding of one input (pooling runner). Raises RequestError for an input the model
        cannot take; cancelling the caller aborts the request."""
        out = None
        async with contextlib.aclosing(self.generate(prompt_token_ids, params, request_id)) as gen:
            async for out in gen:
                pass
        return out

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def kv_cache_free_blocks(self) -> int:
        return self.engine.kv_cache_usage()[0]  # 0 for an embedding engine, which has no KV cache

    def kv_cache_num_blocks(self) -> int:
        return self.engine.kv_cache_usage()[1]

    def num_unfinished_requests(self) -> int:
        return self.engine.num_unfinished_requests

    # ---- the engine thread ---------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _post(self, request_id: str, item) -> None:
        self._loop.call_soon_threadsafe(self._deliver, request_id, item)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, request_id, prompt_token_ids, params, priority, mm_inputs = msg
            try:
                if mm_inputs is not None:
                    self.engine.add_request(request_id, prompt_token_ids, params, priority,
                                            mm_inputs=mm_inputs)
                elif priority:
                    self.engine.add_request(request_id, prompt_token_ids, params, priority)
                else:  # the embedding engine takes no priority
                    self.engine.add_request(request_id, prompt_token_ids, params)
            except RequestError as e:
                self._post(request_id, e)
        elif kind == "abort":
            self.engine.abort_request(msg[1])

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping.is_set():
                # block only when idle; otherwise drain what arrived and step
                if not engine.has_unfinished_requests():
                    self._handle(self._inbox.get())
                while True:
                    try:
                        self._handle(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if self._stopping.is_set() or not engine.has_unfinished_requests():
                    continue
                for out in engine.step():
                    self._post(out.request_id, out)
        except BaseException as e:  # the loop must never die silently, nor live on broken
            self._die(e)

    def _die(self, error: BaseException) -> None:
        logger.critical("the engine loop failed; the process exits so it can be restarted",
                        exc_info=error)
        self._error = error
        dead = EngineDeadError("the engine stopped on an internal error; the server is restarting")
        for request_id in list(self._streams):
            self._post(request_id, dead)
        try:  # let the event loop hand the errors out before the process goes
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0.5), self._loop).result(FATAL_GRACE_S)
        except Exception:
            pass
        self.on_fatal(error)
