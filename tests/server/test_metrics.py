"""PrometheusStatLogger alone: vLLM's names, labels and buckets from synthetic engine stats."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from kubeinfer.engine.server.metrics import (ITL_BUCKETS, TTFT_BUCKETS, PrometheusStatLogger,
                                             build_1_2_5_buckets)
from kubeinfer.engine.stats import FinishedRequestStats, IterationStats, SchedulerStats


def sample(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, {"model_name": "m", **labels})


def test_records_vllm_series():
    registry = CollectorRegistry()
    logger = PrometheusStatLogger("m", registry)
    logger.record(
        SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.25,
                       prefix_cache_queries=100, prefix_cache_hits=40, num_preemptions=1),
        IterationStats(num_prompt_tokens=50, num_generation_tokens=3, num_scheduled_tokens=53,
                       time_to_first_tokens=[0.03],
                       inter_token_latencies=[0.02, 0.04], finished_requests=[
                           FinishedRequestStats("stop", 1.2, 0.1, 10, 5, prefill_time=0.3,
                                                decode_time=0.8, max_tokens=5),
                           FinishedRequestStats("length", 2.0, 0.2, 10, 16, prefill_time=0.1,
                                                decode_time=1.5, max_tokens=16),
                           FinishedRequestStats("abort", 0.5, 0.1, 10, 2)]))
    logger.record(SchedulerStats(num_running_reqs=1, kv_cache_usage=0.5, prefix_cache_queries=10),
                  IterationStats(num_generation_tokens=1))
    assert sample(registry, "vllm:num_requests_running") == 1
    assert sample(registry, "vllm:num_requests_waiting") == 0
    assert sample(registry, "vllm:kv_cache_usage_perc") == 0.5
    assert sample(registry, "vllm:prompt_tokens_total") == 50
    assert sample(registry, "vllm:generation_tokens_total") == 4
    assert sample(registry, "vllm:num_preemptions_total") == 1
    assert sample(registry, "vllm:prefix_cache_queries_total") == 110
    assert sample(registry, "vllm:prefix_cache_hits_total") == 40
    assert sample(registry, "vllm:request_success_total", finished_reason="stop") == 1
    assert sample(registry, "vllm:request_success_total", finished_reason="length") == 1
    assert sample(registry, "vllm:request_success_total", finished_reason="abort") is None
    assert sample(registry, "vllm:time_to_first_token_seconds_count") == 1
    assert sample(registry, "vllm:inter_token_latency_seconds_count") == 2
    assert sample(registry, "vllm:e2e_request_latency_seconds_count") == 2  # aborts not timed
    assert sample(registry, "vllm:request_queue_time_seconds_sum") == 0.1 + 0.2
    assert sample(registry, "vllm:time_to_first_token_seconds_bucket", le="0.04") == 1
    assert sample(registry, "vllm:time_to_first_token_seconds_bucket", le="0.02") == 0
    # the series vLLM added later or kept under old names
    assert sample(registry, "vllm:gpu_cache_usage_perc") == 0.5
    assert sample(registry, "vllm:iteration_tokens_total_count") == 1  # the second step ran no tokens
    assert sample(registry, "vllm:iteration_tokens_total_sum") == 53
    assert sample(registry, "vllm:time_per_output_token_seconds_count") == 2
    assert sample(registry, "vllm:request_prefill_time_seconds_sum") == 0.3 + 0.1
    assert sample(registry, "vllm:request_decode_time_seconds_sum") == 0.8 + 1.5
    assert abs(sample(registry, "vllm:request_inference_time_seconds_sum") - 2.7) < 1e-9
    assert abs(sample(registry, "vllm:request_time_per_output_token_seconds_sum")
               - (0.8 / 4 + 1.5 / 15)) < 1e-9
    assert sample(registry, "vllm:request_params_max_tokens_sum") == 21


def test_vllm_bucket_choices():
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0 and len(TTFT_BUCKETS) == 22
    assert ITL_BUCKETS[0] == 0.01 and ITL_BUCKETS[-1] == 80.0
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]


def test_each_registry_is_separate():
    a, b = CollectorRegistry(), CollectorRegistry()
    PrometheusStatLogger("m", a).record(SchedulerStats(num_running_reqs=7), IterationStats())
    PrometheusStatLogger("m", b)
    assert sample(a, "vllm:num_requests_running") == 7
    assert sample(b, "vllm:num_requests_running") == 0
    text = generate_latest(a).decode()
    assert "# TYPE vllm:prompt_tokens_total counter" in text or \
        "# TYPE vllm:prompt_tokens counter" in text
    assert 'vllm:prompt_tokens_total{model_name="m"} 0.0' in text
