"""Prometheus series with vLLM's exact names, so vLLM dashboards and autoscaling rules work unchanged.

The engine calls `record` from its own thread after each step; prometheus_client's metric objects
are thread-safe. Each server owns a `CollectorRegistry`, so several servers can live in one process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kubeinfer.engine.config import CacheConfig
from kubeinfer.engine.stats import IterationStats, SchedulerStats

# vLLM's bucket choices (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0]
ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value, as vLLM buckets token counts."""
    buckets, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exponent
            if v > max_value:
                return buckets
            buckets.append(v)
        exponent += 1


def _cache_config_info(registry: CollectorRegistry, cache: CacheConfig) -> None:
    """vllm:cache_config_info: 1, with the KV cache settings as labels (vLLM's info metric), which
    the Gateway API Inference Extension's endpoint picker reads for block_size. num_gpu_blocks is
    the override when given, else empty: the count is decided later, by the engine."""
    info = {"block_size": str(cache.block_size),
            "enable_prefix_caching": str(cache.enable_prefix_caching),
            "gpu_memory_utilization": str(cache.gpu_memory_utilization),
            "num_gpu_blocks": str(cache.num_gpu_blocks_override or "")}
    Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(info),
          registry=registry).labels(**info).set(1)


class PrometheusStatLogger:
    """A `StatLogger` that exports engine stats as vLLM's `vllm:*` series, labelled by model_name."""

    def __init__(self, model_name: str, registry: CollectorRegistry, max_model_len: int = 8192,
                 cache_config: CacheConfig | None = None):
        labels = ["model_name"]
        self.model_name = model_name
        if cache_config is not None:
            _cache_config_info(registry, cache_config)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            # prometheus_client appends "_total" to a Counter's exposed name
            return Counter(name, doc, labels + list(extra), registry=registry)

        def histogram(name: str, doc: str, buckets: list) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        m = model_name
        self.running = gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.").labels(m)
        self.waiting = gauge("vllm:num_requests_waiting",
                             "Number of requests waiting to be processed.").labels(m)
        self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                              "KV-cache usage. 1 means 100 percent usage.").labels(m)
        # the name before vLLM 0.10, still read by older dashboards and inference gateways
        self.gpu_cache_usage = gauge("vllm:gpu_cache_usage_perc",
                                     "GPU KV-cache usage. 1 means 100 percent usage. Deprecated: "
                                     "use vllm:kv_cache_usage_perc.").labels(m)
        self.prompt_tokens = counter("vllm:prompt_tokens",
                                     "Number of prefill tokens processed.").labels(m)
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.").labels(m)
        self.preemptions = counter("vllm:num_preemptions",
                                   "Cumulative number of preemption from the engine.").labels(m)
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.").labels(m)
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.").labels(m)
        self._success = counter("vllm:request_success", "Count of successfully processed requests.",
                                ("finished_reason",))
        self.success = {r: self._success.labels(m, r) for r in ("stop", "length")}
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS).labels(m)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS).labels(m)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds. Deprecated: use "
                              "vllm:inter_token_latency_seconds.", ITL_BUCKETS).labels(m)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.",
                                      ITL_BUCKETS).labels(m)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.",
                                          ITERATION_TOKEN_BUCKETS).labels(m)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS).labels(m)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    REQUEST_LATENCY_BUCKETS).labels(m)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.",
                                        REQUEST_LATENCY_BUCKETS).labels(m)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.",
                                      REQUEST_LATENCY_BUCKETS).labels(m)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.",
                                     REQUEST_LATENCY_BUCKETS).labels(m)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                               "Number of prefill tokens processed.",
                                               token_buckets).labels(m)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.",
                                                   token_buckets).labels(m)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.",
                                           token_buckets).labels(m)

    def record(self, scheduler_stats: SchedulerStats | None,
               iteration_stats: IterationStats | None) -> None:
        if scheduler_stats is not None:
            self.running.set(scheduler_stats.num_running_reqs)
            self.waiting.set(scheduler_stats.num_waiting_reqs)
            self.kv_usage.set(scheduler_stats.kv_cache_usage)
            self.gpu_cache_usage.set(scheduler_stats.kv_cache_usage)
            self.prefix_queries.inc(scheduler_stats.prefix_cache_queries)
            self.prefix_hits.inc(scheduler_stats.prefix_cache_hits)
            self.preemptions.inc(scheduler_stats.num_preemptions)
        if iteration_stats is None:
            return
        self.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        self.generation_tokens.inc(iteration_stats.num_generation_tokens)
        for t in iteration_stats.time_to_first_tokens:
            self.ttft.observe(t)
        if iteration_stats.num_scheduled_tokens:
            self.iteration_tokens.observe(iteration_stats.num_scheduled_tokens)
        for t in iteration_stats.inter_token_latencies:
            self.itl.observe(t)
            self.tpot.observe(t)
        for req in iteration_stats.finished_requests:
            if req.finish_reason == "abort":
                continue  # a client that went away is not a success, nor a latency sample
            counter = self.success.get(req.finish_reason)
            if counter is None:
                counter = self.success[req.finish_reason] = self._success.labels(
                    self.model_name, req.finish_reason)
            counter.inc()
            self.e2e.observe(req.e2e_latency)
            self.queue_time.observe(req.queue_time)
            self.request_prompt_tokens.observe(req.num_prompt_tokens)
            self.request_generation_tokens.observe(req.num_generation_tokens)
            self.inference_time.observe(req.prefill_time + req.decode_time)
            self.prefill_time.observe(req.prefill_time)
            self.decode_time.observe(req.decode_time)
            if req.num_generation_tokens > 1:
                self.request_tpot.observe(req.decode_time / (req.num_generation_tokens - 1))
            if req.max_tokens is not None:
                self.params_max_tokens.observe(req.max_tokens)
