"""`RouterConfig`: every setting of the router, frozen and checked on construction."""
from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("least-load", "prefix-hash")


class RouterConfigError(ValueError):
    """A router setting a user gave is out of range; the message says which and what to use."""


@dataclass(frozen=True)
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    # scale from zero: how long a request waits for a ready replica, and how many may wait per model
    max_queue_wait: float = 300.0
    max_queue_size: int = 1000
    # seconds a client is told to wait (Retry-After) when the router answers 503
    retry_after: int = 10
    default_strategy: str = "least-load"
    # prefix-hash: characters of the chat prefix / prompt (or token ids of a token prompt) hashed
    prefix_chars: int = 100
    prefix_tokens: int = 32
    # bounded load: no replica takes more than load_factor x the mean in-flight count (+1)
    load_factor: float = 1.25
    ring_replicas: int = 100
    # a replica that failed this many times in a row is skipped for `eject_seconds`
    max_failures: int = 3
    eject_seconds: float = 30.0
    connect_timeout: float = 5.0
    max_body_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise RouterConfigError(what)
        need(0 < self.port < 65536, f"port ({self.port}) must be between 1 and 65535")
        need(self.max_queue_wait >= 0, f"max queue wait ({self.max_queue_wait}) must be >= 0 seconds")
        need(self.max_queue_size >= 0, f"max queue size ({self.max_queue_size}) must be >= 0")
        need(self.retry_after >= 1, f"retry after ({self.retry_after}) must be >= 1 second")
        need(self.default_strategy in STRATEGIES,
             f"load balancing strategy {self.default_strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        need(self.prefix_chars >= 1, f"prefix chars ({self.prefix_chars}) must be >= 1")
        need(self.prefix_tokens >= 1, f"prefix tokens ({self.prefix_tokens}) must be >= 1")
        need(self.load_factor >= 1.0,
             f"load factor ({self.load_factor}) must be >= 1.0: below the mean no replica could take a request")
        need(self.ring_replicas >= 1, f"ring replicas ({self.ring_replicas}) must be >= 1")
        need(self.max_failures >= 1, f"max failures ({self.max_failures}) must be >= 1")
        need(self.eject_seconds >= 0, f"eject seconds ({self.eject_seconds}) must be >= 0")
        need(self.connect_timeout > 0, f"connect timeout ({self.connect_timeout}) must be > 0 seconds")
        need(self.max_body_bytes >= 1024, f"max body bytes ({self.max_body_bytes}) must be >= 1024")
