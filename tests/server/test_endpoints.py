"""/v1/models, /tokenize, /detokenize, /health, /version, /metrics."""
from __future__ import annotations

from kubeinfer import __version__
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME


def test_models_lists_the_served_name(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    [entry] = raw["data"]
    assert entry["object"] == "model"
    assert entry["owned_by"] == "kubeinfer"
    assert entry["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_tokenize_and_detokenize_round_trip(http):
    r = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "Hello world, hello kube"})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == MAX_MODEL_LEN
    plain = http.post("/tokenize", json={"prompt": "Hello world, hello kube",
                                         "add_special_tokens": False}).json()["tokens"]
    text = http.post("/detokenize", json={"model": MODEL_NAME, "tokens": plain}).json()["prompt"]
    assert text == "Hello world, hello kube"


def test_tokenize_messages_applies_the_chat_template(http):
    messages = [{"role": "user", "content": "Hi there"}]
    with_prompt = http.post("/tokenize", json={"messages": messages}).json()
    without = http.post("/tokenize", json={"messages": messages,
                                           "add_generation_prompt": False}).json()
    plain = http.post("/tokenize", json={"prompt": "Hi there"}).json()
    assert with_prompt["count"] > without["count"] > plain["count"] - 2


def test_tokenize_needs_prompt_or_messages(http):
    r = http.post("/tokenize", json={})
    assert r.status_code == 400
    assert "prompt" in r.json()["error"]["message"]


def test_detokenize_out_of_range_token(http):
    r = http.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400
    assert "out of range" in r.json()["error"]["message"]


def test_health_and_version(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json() == {"version": __version__}


def test_metrics_carry_vllm_names_after_a_request(client, http):
    client.completions.create(model=MODEL_NAME, prompt="metrics please", max_tokens=3,
                              extra_body={"ignore_eos": True})
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:gpu_cache_usage_perc", "vllm:iteration_tokens_total_bucket",
                 "vllm:time_per_output_token_seconds_bucket",
                 "vllm:request_time_per_output_token_seconds_bucket",
                 "vllm:request_inference_time_seconds_bucket",
                 "vllm:request_prefill_time_seconds_bucket",
                 "vllm:request_decode_time_seconds_bucket", "vllm:request_params_max_tokens_bucket"):
        assert f'{name}{{' in text, name
    success = [line for line in text.splitlines() if line.startswith("vllm:request_success_total{")
               and 'finished_reason="length"' in line and f'model_name="{MODEL_NAME}"' in line]
    assert success and float(success[0].split()[-1]) >= 1
    generated = [line for line in text.splitlines()
                 if line.startswith("vllm:generation_tokens_total{")]
    assert float(generated[0].split()[-1]) >= 3


def test_chat_template_flag_replaces_the_tokenizers(server_factory):
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    server = server_factory(chat_template=plain)
    with server.http() as http:
        messages = [{"role": "user", "content": "Hello there"}]
        via_template = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
        expected = http.post("/tokenize", json={"prompt": "user: Hello there\n",
                                                "add_special_tokens": False}).json()["tokens"]
        assert via_template == expected
        r = server.client().chat.completions.create(model=MODEL_NAME, messages=messages,
                                                    max_tokens=1)
        assert r.usage.prompt_tokens == len(expected)
