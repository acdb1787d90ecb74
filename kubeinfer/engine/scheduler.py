"""Continuous batching: which requests get how many tokens this step. Policy only, no tensors.

The scheduler owns every Request and is the only writer of request state. Each step it emits a
plain-data `SchedulerOutput` (scheduler_output.py): new requests whole the first time, then only
the diff, so the device side never holds a Request.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from kubeinfer.engine.attention_spans import stop_before_span
from kubeinfer.engine.config import SchedulerConfig
from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.in_flight import InFlightRequests
from kubeinfer.engine.kv_cache.manager import KVCacheManager
from kubeinfer.engine.multimodal.chunk_images import end_before_image, images_in_chunk
from kubeinfer.engine.multimodal.encoder_cache import EncoderCacheManager
from kubeinfer.engine.outputs import ModelRunnerOutput
from kubeinfer.engine.request import PLACEHOLDER, Request, RequestStatus
from kubeinfer.engine.scheduler_output import NewRequestData, SchedulerOutput
from kubeinfer.engine.stats import SchedulerStats
from kubeinfer.engine.structured_output.manager import StructuredOutputManager


@dataclass
class TokenUpdate:
    """What one request got from a step: a new token (and its logprobs), and whether it finished."""

    req: Request
    new_token_ids: list[int]
    new_logprobs: list | None
    finished: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int,
                 structured_output: StructuredOutputManager | None = None,
                 pipeline_depth: int = 1):
        self.config = config
        # pipeline stages: the requests of the steps in flight, each in one step at most
        self.in_flight = InFlightRequests(pipeline_depth)
        self.structured_output = structured_output
        # constrained requests whose grammar is still compiling: they join `waiting` once it is
        # done, so a slow schema never holds up the queue behind it
        self.compiling: list[Request] = []
        # constrained requests whose grammar did not compile, for the engine to report
        self.grammar_failures: list[tuple[Request, RequestError]] = []
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._num_preemptions = 0  # since the last stats snapshot
        # what the runner has been told: blocks sent per request it holds; and the requests to
        # drop from its batch, sent with the next step that runs
        self._num_sent_blocks: dict[str, int] = {}
        self._finished_req_ids: set[str] = set()
        self._preempted_req_ids: list[str] = []
        # vision-encoder outputs, counted in embedding rows: as many as a step computes tokens,
        # so an image that fits a step's budget always fits the cache (add_request checks it)
        self.encoder_cache = EncoderCacheManager(config.max_num_batched_tokens)

    # ---- requests in and out -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.is_constrained:
            if self.structured_output is None:
                raise RequestError("this engine does not run structured outputs (it has no "
                                   "tokenizer); leave the constraint out", "structured_outputs")
            self.structured_output.submit(req.req_id, req.sampling_params.structured_outputs)
            self.requests[req.req_id] = req
            self.compiling.append(req)
            return
        self.requests[req.req_id] = req
        self._enqueue(req, front=False)

    def _admit_compiled(self) -> None:
        """Move constrained requests whose grammar is ready to the queue; fail those whose grammar
        did not compile (each alone, with the compiler's error)."""
        still = []
        for req in self.compiling:
            try:
                ready = self.structured_output.take_ready(req.req_id, req.prompt_token_ids)
            except RequestError as e:
                self.requests.pop(req.req_id, None)
                self.structured_output.free(req.req_id)
                req.status = RequestStatus.FINISHED_ERROR
                self.grammar_failures.append((req, e))
                continue
            if ready:
                req.is_grammar_ready = True
                self._enqueue(req, front=False)
            else:
                still.append(req)
        self.compiling = still

    def _enqueue(self, req: Request, front: bool) -> None:
        """FCFS: new requests at the back, preempted ones at the front. Priority: by
        (priority, arrival), so a preempted request goes back before later arrivals of its rank."""
        if self.config.scheduling_policy == "fcfs":
            self.waiting.appendleft(req) if front else self.waiting.append(req)
            return
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].priority_key > req.priority_key:
            i -= 1
        self.waiting.insert(i, req)

    def _pick_victim(self) -> int:
        """Index in `running` of the request to preempt: the newest (FCFS), or the lowest priority,
        latest among equals (priority)."""
        if self.config.scheduling_policy == "fcfs":
            return len(self.running) - 1
        return max(range(len(self.running)), key=lambda k: self.running[k].priority_key)

    def finish_request(self, req_id: str, status: RequestStatus) -> Request | None:
        """Finish (stop string, abort) a request wherever it is; its blocks go back to the pool."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.compiling:
            self.compiling.remove(req)
        else:
            self.waiting.remove(req)
        if self.structured_output is not None and req.is_constrained:
            self.structured_output.free(req_id)
        req.status = status
        self.kv.free(req)
        self.encoder_cache.release_request(req_id)
        self._num_sent_blocks.pop(req_id, None)
        self._finished_req_ids.add(req_id)  # preempted ones too: the runner holds their generator
        return req

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Hand out this step's token budget.

        Invariant: there is no prefill phase and no decode phase. Each request has
        num_computed_tokens, and gets up to num_tokens - num_computed_tokens more tokens; a long
        prompt is chunked by the budget, a cached prefix simply starts it further along, and a decode
        is the case of one token. Running requests go first, in admission order; if one cannot get
        blocks, a running request is preempted (its blocks freed, recomputed later) until it fits:
        the newest (fcfs) or the lowest priority (priority; one already scheduled this step loses
        its place in the step). Waiting requests are admitted in queue order (arrival, or priority
        then arrival) only in a step with no preemption.
        """
        if self.compiling:
            self._admit_compiled()
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []
        budget = self.config.max_num_batched_tokens
        encoder_budget = self.config.max_num_batched_tokens  # encoder rows computed this step
        encoder_inputs: dict[str, list[int]] = {}
        now = time.monotonic()
        limit = self.in_flight.step_limit(len(self.running) + len(self.waiting),
                                          self.config.max_num_seqs)

        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < limit:
            req = self.running[i]
            # async scheduling: its last token is already in flight; pipeline stages: its step is
            if req.is_capped or req.req_id in self.in_flight:
                i += 1
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            num_new = self._plan_encoders(req, req.num_computed_tokens, num_new, encoder_budget)
            num_new = stop_before_span(req.bidir_spans, req.num_computed_tokens, num_new)
            if num_new == 0:  # its next image's encoder, or its next whole span, has no room
                i += 1
                continue
            while not self.kv.allocate_slots(req, num_new):
                k = self._pick_victim()
                victim = self.running.pop(k)
                self._preempt(victim)
                preempted.append(victim.req_id)
                if victim is req:
                    break
                if k < i:  # priority: a request already passed this step (scheduled, or capped)
                    i -= 1
                    for j, (r, n) in enumerate(scheduled):
                        if r is victim:
                            del scheduled[j]
                            budget += n
                            break
            else:
                encoder_budget -= self._commit_encoders(req, req.num_computed_tokens, num_new,
                                                        encoder_inputs)
                scheduled.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted: nothing after it is left either

        num_running = len(scheduled)
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs \
                    and len(scheduled) < limit:
                req = self.waiting[0]
                if req.req_id in self.in_flight:  # preempted while its step is still running
                    break
                hits, num_cached = self.kv.get_computed_blocks(req)
                num_new = req.num_tokens - num_cached
                if not self.config.enable_chunked_prefill and num_new > budget:
                    break
                num_new = min(num_new, budget)
                num_new = self._plan_encoders(req, num_cached, num_new, encoder_budget)
                num_new = stop_before_span(req.bidir_spans, num_cached, num_new)
                if num_new == 0 or not self.kv.allocate_slots(req, num_new, hits):
                    break
                encoder_budget -= self._commit_encoders(req, num_cached, num_new, encoder_inputs)
                self.waiting.popleft()
                req.num_computed_tokens = num_cached
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_cached
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                scheduled.append((req, num_new))
                budget -= num_new
        self._preempted_req_ids += preempted
        out = self._make_output(scheduled[:num_running], scheduled[num_running:])
        # a preempted request's images were released: drop its entries scheduled before that
        out.scheduled_encoder_inputs = {r: ix for r, ix in encoder_inputs.items()
                                        if r in out.num_scheduled_tokens}
        if not out.is_empty:
            out.freed_encoder_hashes = self.encoder_cache.take_freed()
        return out

    def _plan_encoders(self, req: Request, start: int, num_new: int,
                       encoder_budget: int) -> int:
        """How many of num_new tokens from `start` can run, given the images the chunk needs: a
        chunk stops before an image whose encoder has no room in the cache or in the step's
        encoder budget. Changes nothing; `_commit_encoders` does once the request is scheduled."""
        if not req.mm_features:
            return num_new
        cache, run, rows = self.encoder_cache, [], 0
        for k in images_in_chunk(req.mm_features, start, start + num_new):
            f = req.mm_features[k]
            if cache.holds(req.req_id, f.image_hash) or cache.is_cached(f.image_hash):
                continue
            if any(req.mm_features[j].image_hash == f.image_hash for j in run):
                continue  # the same picture twice in one prompt: one encoder run
            need = f.placeholder.num_embeds
            if rows + need > encoder_budget or not cache.can_allocate(rows + need):
                return end_before_image(f, start) - start
            run.append(k)
            rows += need
        return num_new

    def _commit_encoders(self, req: Request, start: int, num_new: int,
                         encoder_inputs: dict[str, list[int]]) -> int:
        """Reserve the encoder outputs the scheduled chunk [start, start + num_new) reads: the
        planned ones (`run`) are computed this step, cached ones (another request's, or this
        prompt's repeated picture) get a reference so they outlive the chunk. An image planned as
        cached whose output a preemption has since released is computed again. Returns the encoder
        rows computed this step."""
        if not req.mm_features:
            return 0
        cache, rows, run = self.encoder_cache, 0, []
        for k in images_in_chunk(req.mm_features, start, start + num_new):
            f = req.mm_features[k]
            if cache.holds(req.req_id, f.image_hash):
                continue
            if cache.is_cached(f.image_hash):
                cache.add_ref(req.req_id, f.image_hash)
                continue
            cache.allocate(req.req_id, f.image_hash, f.placeholder.num_embeds)
            rows += f.placeholder.num_embeds
            run.append(k)
        if run:
            encoder_inputs[req.req_id] = run
        return rows

    def _make_output(self, running: list[tuple[Request, int]],
                     admitted: list[tuple[Request, int]]) -> SchedulerOutput:
        """The plain-data plan: admitted requests whole, running ones as the diff since their last
        step. Finished and preempted ids ride on the next step that runs."""
        out = SchedulerOutput()
        cached = out.scheduled_cached_reqs
        for req, n in running:
            block_ids = self.kv.get_block_ids(req.req_id)
            sent = self._num_sent_blocks[req.req_id]
            cached.req_ids.append(req.req_id)
            cached.new_block_ids.append(block_ids[sent:])
            cached.num_computed_tokens.append(req.num_computed_tokens)
            self._num_sent_blocks[req.req_id] = len(block_ids)
            out.num_scheduled_tokens[req.req_id] = n
            if self.in_flight.enabled and req.output_token_ids:
                # only the last stage sampled it; the other ranks hold a placeholder
                out.resolved_output_tokens[req.req_id] = (req.num_output_tokens - 1,
                                                          req.output_token_ids[-1])
        for req, n in admitted:
            block_ids = list(self.kv.get_block_ids(req.req_id))
            out.scheduled_new_reqs.append(NewRequestData(
                req_id=req.req_id, prompt_token_ids=req.prompt_token_ids,
                output_token_ids=list(req.output_token_ids), sampling_params=req.sampling_params,
                eos_token_ids=req.eos_token_ids, block_ids=block_ids,
                num_computed_tokens=req.num_computed_tokens,
                prompt_logits_start=req.prompt_logits_start, mm_features=req.mm_features,
                bidir_spans=req.bidir_spans))
            self._num_sent_blocks[req.req_id] = len(block_ids)
            out.num_scheduled_tokens[req.req_id] = n
        out.structured_output_req_ids = {req.req_id for req, _ in running + admitted
                                         if req.is_constrained}
        if not out.is_empty:
            out.finished_req_ids, self._finished_req_ids = self._finished_req_ids, set()
            out.preempted_req_ids, self._preempted_req_ids = self._preempted_req_ids, []
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self.encoder_cache.release_request(req.req_id)
        self._num_sent_blocks.pop(req.req_id, None)
        req.is_capped = False
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self._num_preemptions += 1
        self._enqueue(req, front=True)

    def update(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[TokenUpdate]:
        """Advance each scheduled request; append sampled tokens; finish on EOS/stop id/length.

        `result.sampled` holds a token for each request whose scheduled tokens reached its end (a
        chunk in the middle of a prompt samples nothing); `result.prompt_logprobs` (first position,
        rows) for each request that computed prompt logprobs this step.
        """
        # the synchronous step is the asynchronous one with the tokens already known
        return self.resolve(self.advance(out), result)

    def _check_stop(self, req: Request, token: int, num_outputs: int) -> RequestStatus | None:
        """Whether `token`, the request's num_outputs-th output, ends it."""
        params = req.sampling_params
        if num_outputs > params.min_tokens:  # the first min_tokens may not stop
            if not params.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_outputs >= req.max_tokens or req.num_prompt_tokens + num_outputs >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- async scheduling: launch step N+1 before step N's tokens are known ----------------------
    def advance(self, out: SchedulerOutput) -> list[tuple[Request, int]]:
        """Account for a launched step whose tokens are not known yet: advance each request and
        append a PLACEHOLDER for each token being sampled. Returns (request, output index) of each
        placeholder, in sampling order, for `resolve`."""
        pending = []
        self.in_flight.launched(out.num_scheduled_tokens)
        for req_id, num_new in out.num_scheduled_tokens.items():
            req = self.requests[req_id]
            samples = req.num_computed_tokens + num_new == req.num_tokens
            req.num_computed_tokens += num_new
            if req.mm_features:  # images whose positions are all computed are done with
                self.encoder_cache.consume(req_id, req.mm_features, req.num_computed_tokens)
            if samples:
                req.append_output_token(PLACEHOLDER)
                pending.append((req, req.num_output_tokens - 1))
                # a length limit is known now; EOS and stop ids only once the token is
                if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
                    req.is_capped = True
        return pending

    def resolve(self, pending: list[tuple[Request, int]],
                result: ModelRunnerOutput) -> list[TokenUpdate]:
        """Put a finished step's tokens in place of its placeholders and finish requests that
        stop. A request that finished meanwhile (aborted, or stopped one step earlier) is skipped:
        the step computed its token for nothing, and the token is dropped. The step's prompt
        logprobs are collected first, so a request's are whole by the time its first token is."""
        sampled, logprobs, prompt_logprobs = result.sampled, result.logprobs, result.prompt_logprobs
        self.in_flight.landed()  # steps are read in launch order
        if prompt_logprobs:
            for req_id, (start, rows) in prompt_logprobs.items():
                req = self.requests.get(req_id)
                if req is not None:
                    req.add_prompt_logprobs(start, rows)
        updates = []
        constrained = []  # (position in updates, status, index) of constrained requests
        now = time.monotonic()
        for req, index in pending:
            if req.is_finished or index >= req.num_output_tokens:
                continue
            token = sampled[req.req_id]
            req.set_output_token(index, token)
            lp = logprobs.get(req.req_id) if logprobs else None
            if lp is not None:
                req.output_logprobs.append(lp)
            if req.first_token_time is None:
                req.first_token_time = now
            status = self._check_stop(req, token, index + 1)
            update = TokenUpdate(req, [token], None if lp is None else [lp], False)
            if req.is_constrained:
                constrained.append((len(updates), status, index))
            else:
                self._end(update, index, status)
            updates.append(update)
        if constrained:
            self._advance_grammars(updates, constrained)
        return updates

    def _end(self, update: TokenUpdate, index: int, status: RequestStatus | None) -> None:
        if status is not None:
            update.req.truncate_outputs(index + 1)
            self.finish_request(update.req.req_id, status)
            update.finished = True

    def _advance_grammars(self, updates: list[TokenUpdate],
                          constrained: list[tuple[int, RequestStatus | None, int]]) -> None:
        """The matchers take the step's tokens (one call for the step); a grammar that has ended
        stops its request. A token the grammar rejects cannot have been sampled under its mask (it
        is an engine bug, or a token forced past the mask such as EOS under ignore_eos): the
        request fails rather than go on unconstrained."""
        # under async scheduling the runner has fed most of them already (to fill the next mask)
        results = self.structured_output.accept_resolved(
            [(updates[k].req.req_id, index, updates[k].new_token_ids[0])
             for k, _, index in constrained],
            [status is not None for _, status, _ in constrained])
        for (k, status, index), (accepted, terminated) in zip(constrained, results):
            if not accepted:
                status = status or RequestStatus.FINISHED_ERROR
            elif terminated and status is None:
                status = RequestStatus.FINISHED_STOPPED
            self._end(updates[k], index, status)

    def make_stats(self) -> SchedulerStats:
        queries, hits = self.kv.take_prefix_cache_stats()
        stats = SchedulerStats(
            num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting) + len(self.compiling),
            kv_cache_usage=self.kv.usage, prefix_cache_queries=queries, prefix_cache_hits=hits,
            num_preemptions=self._num_preemptions)
        self._num_preemptions = 0
        return stats
