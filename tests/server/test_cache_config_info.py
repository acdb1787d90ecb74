"""vllm:cache_config_info: the KV cache settings as labels of a constant 1, as vLLM exports them
(the Gateway API Inference Extension's endpoint picker reads block_size from it)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kubeinfer.engine.config import CacheConfig
from kubeinfer.engine.server.metrics import PrometheusStatLogger


def test_cache_config_info_carries_the_cache_settings():
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    PrometheusStatLogger("m", registry, cache_config=CacheConfig(block_size=32, enable_prefix_caching=False,
                                                                 num_gpu_blocks_override=77))
    [sample] = [s for f in text_string_to_metric_families(generate_latest(registry).decode())
                for s in f.samples if s.name == "vllm:cache_config_info"]
    assert sample.value == 1
    assert sample.labels == {"block_size": "32", "enable_prefix_caching": "False",
                             "gpu_memory_utilization": "0.9", "num_gpu_blocks": "77"}


def test_without_a_cache_config_there_is_no_info_series():
    registry = CollectorRegistry()
    PrometheusStatLogger("m", registry)
    assert registry.get_sample_value("vllm:cache_config_info", {"block_size": "16"}) is None
    assert not [m for m in registry.collect() if m.name == "vllm:cache_config_info"]
