"""`make_engine`: the synchronous engine for a config, chosen by the model's runner.

Both fronts use it: the offline `LLM` drives the engine itself, `AsyncLLM` from its thread.
"""
from __future__ import annotations

from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.protocol import Engine
from kubeinfer.engine.stats import StatLogger


def make_engine(config: EngineConfig, stat_loggers: list[StatLogger] | tuple = ()) -> Engine:
    """The engine for the model's runner (--runner, auto by architecture): an `LLMEngine` that
    generates, or an `EmbeddingEngine` for encoder-only embedding models. Blocking (it loads the
    model); raises ConfigError for what a user can fix."""
    from kubeinfer.engine.loader.hf_config import load_hf_config
    from kubeinfer.engine.loader.resolve import resolve_model
    from kubeinfer.engine.models.registry import resolve_runner

    path = resolve_model(config.model, config.device.resolve())  # GGUF: for its dtype
    runner = resolve_runner(config.model.runner, load_hf_config(path, config.model))
    if runner == "pooling":
        from kubeinfer.engine.embedding_engine import EmbeddingEngine

        return EmbeddingEngine(config, stat_loggers)
    from kubeinfer.engine.llm_engine import LLMEngine

    return LLMEngine(config, stat_loggers)
