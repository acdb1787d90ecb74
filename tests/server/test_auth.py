"""--api-key: API routes need `Authorization: Bearer KEY`; probes and scrapes stay open."""
from __future__ import annotations

import openai
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME


@pytest.fixture(scope="module")
def server(server_factory):
    running = server_factory(api_key=API_KEY)
    yield running
    running.stop()


def _assert_401(response) -> None:
    assert response.status_code == 401
    err = response.json()["error"]
    assert err["code"] == 401 and err["type"] == "AuthenticationError"
    assert "API key" in err["message"]


def test_missing_key_is_401(http):
    _assert_401(http.get("/v1/models"))
    _assert_401(http.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}))
    _assert_401(http.post("/tokenize", json={"prompt": "hi"}))


def test_wrong_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="not-the-key").models.list()
    with server.http(headers={"Authorization": "Bearer " + API_KEY + "x"}) as h:
        _assert_401(h.get("/v1/models"))
    with server.http(headers={"Authorization": "Basic " + API_KEY}) as h:
        _assert_401(h.get("/v1/models"))


def test_right_key_works(server):
    client = server.client(api_key=API_KEY)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    r = client.chat.completions.create(model=MODEL_NAME, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.role == "assistant"


def test_probes_and_metrics_stay_open(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").status_code == 200
    r = http.get("/metrics")
    assert r.status_code == 200 and "vllm:num_requests_running" in r.text
