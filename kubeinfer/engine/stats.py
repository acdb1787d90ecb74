"""Numbers the engine reports after each step and whenever the scheduler's state changes (a request
added or aborted); metrics loggers turn them into Prometheus series."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class SchedulerStats:
    """A snapshot after a step, plus counters since the previous step."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use, 0..1
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (delta)
    prefix_cache_hits: int = 0  # of those, tokens found (delta)
    num_preemptions: int = 0  # delta


@dataclass
class FinishedRequestStats:
    finish_reason: str  # "stop" | "length" | "abort"
    e2e_latency: float  # seconds from arrival to finish
    queue_time: float  # seconds from arrival to first schedule
    num_prompt_tokens: int
    num_generation_tokens: int
    # the phases of a request that ran (vLLM's request_{prefill,decode,inference}_time_seconds):
    # first schedule -> first token -> finish; zero where a phase did not happen
    prefill_time: float = 0.0
    decode_time: float = 0.0
    max_tokens: int | None = None  # as the request asked


@dataclass
class IterationStats:
    # the whole prompt (prefix-cache hits too) of each request whose first token came this step, as
    # vLLM counts vllm:prompt_tokens_total; hits are reported in SchedulerStats.prefix_cache_hits
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0  # tokens sampled this step
    num_scheduled_tokens: int = 0  # tokens the step computed, prompt and decode (0: none ran)
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)


class StatLogger(Protocol):
    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None: ...
