"""The model's lifecycle in one server: loading (in a thread), serving, draining, closing; and what
a request handler needs beside the engine (config, served names, metrics registry, API key).

The server listens before the model is loaded (kubelet's startup probe and clients get 503 rather
than "connection refused"), so the engine arrives later, from a loader thread, and may never arrive.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry

from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.multimodal import MultiModalConfig, MultiModalPreprocessor
from kubeinfer.engine.protocol import EngineClient
from kubeinfer.engine.server.drain import Drain
from kubeinfer.engine.server.errors import APIError, model_not_found
from kubeinfer.engine.server.metrics import PrometheusStatLogger

logger = logging.getLogger("kubeinfer.server")

EngineFactory = Callable[[EngineConfig, list], EngineClient]


def default_engine_factory(config: EngineConfig, stat_loggers: list) -> EngineClient:
    from kubeinfer.engine.async_engine import AsyncLLM

    return AsyncLLM.from_config(config, stat_loggers=stat_loggers)


def _preprocessor(engine: EngineClient, config: EngineConfig, name: str) -> MultiModalPreprocessor:
    """The media path of the loaded model (--limit-mm-per-prompt, --allowed-media-domains,
    --allowed-local-media-path); one that refuses images for a text-only model."""
    mm_config = MultiModalConfig.from_model_config(config.model)
    path = getattr(getattr(engine, "engine", None), "model_path", None)
    if path is None or not getattr(engine.engine, "is_multimodal", False):
        return MultiModalPreprocessor(None, mm_config, name)
    return MultiModalPreprocessor.from_model(path, mm_config, name)


def describe_load_error(config: EngineConfig, exc: BaseException) -> str:
    """The line a user reads when the model did not load; a ConfigError already says what to do."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, (FileNotFoundError, OSError)):
        return f"could not load model {config.model.model!r}: {exc}"
    return f"could not load model {config.model.model!r}: {type(exc).__name__}: {exc}"


class ModelLifecycle:
    """The engine (None while loading) and everything a request handler needs besides it."""

    def __init__(self, config: EngineConfig, *, api_key: str | None = None,
                 engine_factory: EngineFactory | None = None, log_requests: bool = True,
                 registry: CollectorRegistry | None = None, drain_timeout_s: float = 30,
                 trust_request_chat_template: bool = False,
                 tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False):
        self.config = config
        self.api_key = api_key or None
        self.engine_factory = engine_factory or default_engine_factory
        self.log_requests = log_requests
        self.registry = registry if registry is not None else CollectorRegistry()
        self.engine: EngineClient | None = None
        self.load_error: str | None = None
        # called on the event loop with the message when loading fails; serve.py stops the server
        self.on_load_failure: Callable[[str], None] | None = None
        self._load_task: asyncio.Task | None = None
        self.drain = Drain(drain_timeout_s)
        # render a request's own chat_template (vLLM's --trust-request-chat-template)
        self.trust_request_chat_template = trust_request_chat_template
        # images of chat requests -> MultiModalInputs, off the event loop; set with the engine
        self.mm: MultiModalPreprocessor | None = None
        # --tool-call-parser (its class; an instance per tokenizer is made on first use) and
        # --enable-auto-tool-choice: whether tool_choice "auto" reads tool calls from the output
        self.tool_call_parser = tool_call_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice

    @property
    def served_names(self) -> tuple[str, ...]:
        return self.config.model.served_names

    def ready_engine(self) -> EngineClient:
        """The engine, or a 503 that says why there is none yet."""
        if self.engine is not None and self.engine.is_alive():
            return self.engine
        raise APIError(self.not_ready_reason(), 503)

    def not_ready_reason(self) -> str:
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self.engine is None:
            return f"the model {self.served_names[0]!r} is still loading; retry shortly"
        return "the engine loop is not running"

    def resolve_model(self, model: str | None) -> str:
        """The served name a response reports; a name this server does not serve is a 404."""
        if model is None or model == "":
            return self.served_names[0]
        if model not in self.served_names:
            raise model_not_found(model)
        return model

    # ---- lifecycle, driven by the app's lifespan -------------------------------------------------

    def start_loading(self) -> None:
        self.drain.bind(asyncio.get_running_loop())
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        config = self.config
        stat_logger = PrometheusStatLogger(self.served_names[0], self.registry,
                                           max_model_len=config.model.max_model_len or 32768,
                                           cache_config=config.cache)

        def settle(engine: EngineClient | None, exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(engine)

        def work() -> None:
            try:
                engine, exc = self.engine_factory(config, [stat_logger]), None
                self.mm = _preprocessor(engine, config, self.served_names[0])
            except BaseException as e:  # noqa: BLE001 - every failure must reach the user
                engine, exc = None, e
            try:
                loop.call_soon_threadsafe(settle, engine, exc)
            except RuntimeError:
                pass  # the server stopped while we loaded

        # A daemon thread, not the loop's executor: a SIGTERM during a long load must not wait for it.
        start = time.monotonic()
        logger.info("loading model %s", config.model.model)
        threading.Thread(target=work, name="kubeinfer-load-model", daemon=True).start()
        try:
            engine = await done
            engine.start()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001
            self.load_error = describe_load_error(config, e)
            if not isinstance(e, (ConfigError, OSError)):
                logger.error("model loading failed", exc_info=e)
            if self.on_load_failure is not None:
                self.on_load_failure(self.load_error)
            else:
                logger.error("error: %s", self.load_error)
            return
        self.engine = engine
        logger.info("model %s loaded in %.1fs; serving as %s (max_model_len %d)", config.model.model,
                    time.monotonic() - start, ", ".join(self.served_names), engine.max_model_len)

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.mm is not None:
            self.mm.close()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await engine.shutdown()
