"""`RemoteMatchers`: the manager's bookkeeping of matchers that live in the grammar worker
process (grammar_worker.py): which requests have one, what the job in flight was given, and the
verdicts that came back.

The runner's `start_rows(req_ids, known)` sends step N's tokens and step N+1's rows and returns
at once; the rows are read (`RemoteRows.result()`) when the step samples. In between, the
scheduler resolves step N: `accept_resolved` answers a token the job was given without waiting
for the worker. A token sampled under its own matcher's mask is always accepted, and it ends the
grammar exactly when it is a stop token (the mask allows EOS, the compiler's only stop token,
only where the grammar may end); with a reasoning parser a stop token waits for the worker (the
row may still be reasoning, unmasked). A request's last token (it ends by length or a stop token
whatever the grammar says) is in no job, since the request is in no later step: it is answered
without the worker too, and never checked. Were a token refused anyway (an engine bug), the job's
answer marks the request rejected before its next token is resolved, and that token fails it
(the worker's manager answers False for a rejected request's later tokens); a quick "ended"
that the answer contradicts is logged as the bug it is.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kubeinfer.engine.structured_output.grammar_worker import (GrammarWorker, GrammarWorkerError,
                                                               Known)

logger = logging.getLogger(__name__)


class RemoteRows:
    """The runner's handle on a job's rows (the interface of a Future of the bitmask)."""

    def __init__(self, owner: RemoteMatchers, num_rows: int):
        self._owner, self._num_rows = owner, num_rows

    def done(self) -> bool:
        return False  # the runner then samples when the next step starts (sample_step.py)

    def result(self) -> torch.Tensor:
        self._owner.sync()
        return self._owner.worker.bitmask[:self._num_rows]


class RemoteMatchers:
    """Args: worker: the GrammarWorker; stop_token_ids: the grammars' stop tokens (EOS); stats:
    what counts the host seconds of accepts and fills (accept_seconds, fill_seconds, num_fills:
    the manager, for `kubeinfer bench`); reasoning: whether a reasoning parser is on (then a
    row may still be reasoning, unmasked, and a stop token there ends nothing)."""

    def __init__(self, worker: GrammarWorker, stop_token_ids: Iterable[int], stats: Any,
                 reasoning: bool = False):
        self.worker = worker
        self.stats = stats
        self.stop_token_ids = frozenset(stop_token_ids)
        self.reasoning = reasoning
        # (request id, index) of stop tokens answered "accepted, ended" before the job's verdict
        self._claimed: set[tuple[str, int]] = set()
        self.ids: set[str] = set()  # requests with a matcher in the worker
        self.rejected: set[str] = set()  # a matcher refused one of their tokens
        self._fed: dict[tuple[str, int], int] | None = None  # the job in flight's tokens
        self._known: Known = []  # ... in the order its answer lists them
        # the last answered job's (token, accepted, terminated) by (request id, output index)
        self._verdicts: dict[tuple[str, int], tuple[int, bool, bool]] = {}

    def add(self, req_id: str, compiled: Any, prompt_token_ids: Sequence[int],
            reasoning: Any) -> None:
        self.worker.add(req_id, compiled, prompt_token_ids, reasoning)
        self.ids.add(req_id)

    def free(self, req_id: str) -> None:
        if req_id in self.ids:
            self.worker.free(req_id)
            self.ids.discard(req_id)
        self.rejected.discard(req_id)

    def start_rows(self, req_ids: Sequence[str], known: Iterable[tuple[str, int, int]]
                   ) -> RemoteRows:
        self.sync()
        if len(req_ids) > self.worker.bitmask.shape[0]:  # the scheduler runs at most that many
            raise GrammarWorkerError(f"{len(req_ids)} constrained rows in one step; the grammar "
                                     f"worker's bitmask holds {self.worker.bitmask.shape[0]}")
        wanted = set(req_ids)
        known = [k for k in known if k[0] in wanted and k[0] in self.ids]
        self.worker.job(known, req_ids)
        self._known = known
        self._fed = {(r, i): t for r, i, t in known}
        return RemoteRows(self, len(req_ids))

    def sync(self) -> None:
        """Read the answer of the job in flight, if any: its verdicts and rejections."""
        if self._fed is None:
            return
        self._fed = None
        accepted, terminated, accept_s, fill_s = self.worker.reply()
        self.stats.accept_seconds += accept_s
        self.stats.fill_seconds += fill_s
        self.stats.num_fills += 1
        self._verdicts = {(r, i): (t, ok, end)
                          for (r, i, t), ok, end in zip(self._known, accepted, terminated)}
        for key in self._claimed:
            verdict = self._verdicts.get(key)
            if verdict is not None and not (verdict[1] and verdict[2]):
                logger.error("request %s: output token %d was taken as the end of its grammar, "
                             "but its matcher answered accepted=%s terminated=%s (an engine bug: "
                             "the token was not sampled under its mask)", key[0], key[1],
                             verdict[1], verdict[2])
        self._claimed = set()
        self._note_rejections(self._known, accepted)

    def accept_resolved(self, resolved: Sequence[tuple[str, int, int]],
                        ending: Sequence[bool] | None = None) -> list[tuple[bool, bool]]:
        """(accepted, terminated) of each (request id, output index, token); `ending` (one per
        token, optional) says which requests end with it anyway. See the module docstring for
        which answers wait for the worker."""
        out: list[tuple[bool, bool] | None] = [None] * len(resolved)
        fed = self._fed or {}
        for k, (r, i, t) in enumerate(resolved):
            if r not in self.ids:
                out[k] = (True, False)  # not constrained (or finished): nothing to check
            elif ending is not None and ending[k] and (r, i) not in fed \
                    and r not in self.rejected:
                # its last token (length or a stop token decide the end; a request that ends
                # is in no later step, so no job took it): nothing waits on the verdict, and
                # asking the worker would wait for the job in flight first
                out[k] = (True, False)
            elif fed.get((r, i)) == t and r not in self.rejected:
                if t not in self.stop_token_ids:
                    out[k] = (True, False)
                elif not self.reasoning:
                    # a stop token sampled under its mask: the grammar allowed its end here, so
                    # it takes it and ends (checked when the job's answer comes)
                    out[k] = (True, True)
                    self._claimed.add((r, i))
        if all(v is not None for v in out):
            return out
        self.sync()
        rest = []
        for k, (r, i, t) in enumerate(resolved):
            if out[k] is None:
                verdict = self._verdicts.get((r, i))
                if verdict is not None and verdict[0] == t:
                    out[k] = verdict[1:]
                else:
                    rest.append(k)
        if rest:
            known = [resolved[k] for k in rest]
            self.worker.accept(known)
            accepted, terminated, accept_s, _ = self.worker.reply()
            self.stats.accept_seconds += accept_s
            self._note_rejections(known, accepted)
            for k, ok, end in zip(rest, accepted, terminated):
                out[k] = (ok, end)
        return out

    def _note_rejections(self, known: Known, accepted: list[bool]) -> None:
        for (r, _, _), ok in zip(known, accepted):
            if not ok and r in self.ids:
                self.rejected.add(r)
