"""The real default model, SmolLM2-135M-Instruct, answering a question it knows."""
from __future__ import annotations

import pytest

from kubeinfer.engine.config import DEFAULT_MODEL
from kubeinfer.engine.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from tests.server.conftest import start_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir):
    config = EngineConfig(
        model=ModelConfig(model=str(smollm2_dir), served_model_name=(DEFAULT_MODEL,),
                          max_model_len=512),
        cache=CacheConfig(kv_cache_memory=64 << 20), device=DeviceConfig(device="cpu"))
    running = start_server(ModelLifecycle(config, log_requests=False))
    yield running
    running.stop()


def test_capital_of_france(smollm2_server):
    client = smollm2_server.client()
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24,
                                       temperature=0)
    assert "Paris" in r.choices[0].message.content
    chunks = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r.choices[0].message.content


def test_json_schema_on_the_default_model(smollm2_server):
    import json

    import jsonschema

    person = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = smollm2_server.client().chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=30, temperature=0,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": person}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), person)
