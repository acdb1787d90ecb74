"""The requests in the steps the engine has launched but not read yet, with pipeline stages.

With --pipeline-parallel-size N the engine keeps up to N steps in flight (llm_engine.py's batch
queue), one per stage at best. A request's next input token is the one its step samples, which is
known only once that step returns from the last stage, so a request is in at most one step in
flight: consecutive steps take disjoint sets of requests (micro-batches). The scheduler asks this
class which requests to skip, and how many requests one step may take so that the running ones
spread over the N steps instead of all landing in the first. Steps land in launch order. With one
stage nothing is recorded: async scheduling's one step ahead reuses a request's samples on the
device instead (model_runner.py).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class InFlightRequests:
    def __init__(self, depth: int):
        self.depth = depth  # the steps in flight at most: the number of pipeline stages
        self._steps: deque[list[str]] = deque()  # each launched step's requests, oldest first
        self._req_ids: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.depth > 1

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._req_ids

    def launched(self, req_ids: Iterable[str]) -> None:
        """A step with these requests was launched."""
        if not self.enabled:
            return
        step = list(req_ids)
        overlap = self._req_ids.intersection(step)
        if overlap:  # its inputs would hold a token nobody has sampled yet
            raise RuntimeError(f"requests {sorted(overlap)} were scheduled while a step with "
                               "them is still in flight")
        self._steps.append(step)
        self._req_ids.update(step)

    def landed(self) -> None:
        """The oldest step in flight was read: its requests may be scheduled again."""
        if self.enabled and self._steps:
            self._req_ids.difference_update(self._steps.popleft())

    def step_limit(self, num_unfinished: int, max_num_seqs: int) -> int:
        """How many requests one step may take: all of them with one stage; with N stages an
        N-th of the running and waiting ones (at least one), so each stage gets a share."""
        if not self.enabled:
            return max_num_seqs
        return max(1, min(max_num_seqs, -(-num_unfinished // self.depth)))
