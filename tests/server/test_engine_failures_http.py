"""The engine's errors as the client sees them, with a fake engine that fails on purpose: a failure
on one request is a 500 (an error event then [DONE] in a stream) that never shows the exception's
text; a request the engine refuses is a 400 in its words; a dead engine a 503."""
from __future__ import annotations

import json

import pytest
import transformers

from kubeinfer.engine.errors import EngineDeadError, RequestError, RequestFailedError
from kubeinfer.engine.outputs import RequestOutput
from kubeinfer.engine.protocol import EngineClient
from kubeinfer.engine.server.errors import REQUEST_FAILED_MESSAGE
from tests.server.conftest import MODEL_NAME

SECRET = "CUDA error at /opt/secret/kernel.cu:42"


class FailingEngine:
    """An EngineClient whose generate() yields `num_ok` tokens, then raises what the request's
    seed (10 * kind + num_ok) selects: kind 1 RequestFailedError, 2 RequestError, 3
    EngineDeadError."""

    runner_type = "generate"
    max_model_len = 64
    served_model_names = (MODEL_NAME,)
    default_sampling: dict = {}

    def __init__(self, config, stat_loggers):
        self.config = config
        self.tokenizer = None
        if config is not None:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(config.model.model)
        self.vocab_size = 512

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return True

    async def shutdown(self) -> None:
        pass

    async def generate(self, prompt_token_ids, params, request_id, priority=0):
        kind, num_ok = divmod(params.seed, 10)
        for i in range(num_ok):
            yield RequestOutput(request_id, 0, prompt_token_ids, [7], "x",
                                num_output_tokens=i + 1)
        if kind == 1:
            raise RequestFailedError(SECRET)
        if kind == 2:
            raise RequestError("the prompt is not something I take", "prompt")
        raise EngineDeadError("the engine loop stopped")

    async def encode(self, prompt_token_ids, params, request_id):
        raise NotImplementedError

    def prepare_embedding_input(self, prompt, params, truncate_prompt_tokens=None,
                                add_special_tokens=True, label="input"):
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        pass

    def kv_cache_free_blocks(self) -> int:
        return 0

    def kv_cache_num_blocks(self) -> int:
        return 0

    def num_unfinished_requests(self) -> int:
        return 0


def test_the_fake_is_an_engine_client():
    assert isinstance(FailingEngine(None, []), EngineClient)


@pytest.fixture(scope="module")
def http(server_factory):
    running = server_factory(engine_factory=FailingEngine)
    with running.http() as c:
        yield c


@pytest.mark.parametrize("kind, status, words", [
    (1, 500, REQUEST_FAILED_MESSAGE),
    (2, 400, "not something I take"),
    (3, 503, "engine loop stopped"),
])
@pytest.mark.parametrize("num_ok", [0, 2])
def test_non_stream(http, kind, status, words, num_ok):
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 5,
                                           "seed": 10 * kind + num_ok})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == status
    assert words in r.json()["error"]["message"]
    assert "secret" not in r.text


@pytest.mark.parametrize("kind, status", [(1, 500), (3, 503)])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_ends_with_an_error_event_then_done(http, kind, status, path):
    prompt = ({"prompt": "hi"} if path == "/v1/completions"
              else {"messages": [{"role": "user", "content": "hi"}]})
    r = http.post(path, json={"model": MODEL_NAME, **prompt, "max_tokens": 5, "stream": True,
                              "seed": 10 * kind + 2})
    assert r.status_code == 200  # the headers went out before the failure
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0].get("text", c["choices"][0].get("delta", {}).get("content"))
             for c in chunks[:-1]]
    assert texts[-2:] == ["x", "x"]
    assert chunks[-1]["error"]["code"] == status
    assert "secret" not in r.text
    if kind == 1:
        assert chunks[-1]["error"]["message"] == REQUEST_FAILED_MESSAGE
