"""Token updates -> RequestOutputs: detokenization, stop strings, n > 1 bookkeeping, and the
output kind (SamplingParams.output_kind): a delta per step, or one final output per sample whose
text is decoded once at the end (unless stop strings need it token by token)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kubeinfer.engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens
from kubeinfer.engine.outputs import Logprob, PromptLogprobs, RequestOutput
from kubeinfer.engine.request import Request, RequestStatus
from kubeinfer.engine.sampling_params import RequestOutputKind
from kubeinfer.engine.scheduler import TokenUpdate


@dataclass
class _ChildState:
    parent_id: str
    index: int
    detokenizer: IncrementalDetokenizer | None
    awaits_prompt_logprobs: bool = False  # asked for, and not handed out with an output yet
    final_only: bool = False  # RequestOutputKind.FINAL_ONLY: one output, at the end
    # final-only: the tokens (and logprobs, if asked for) so far, for the final output
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)

    @property
    def decodes_at_end(self) -> bool:
        """Whether the text waits for the end: final-only and no stop string to look for."""
        return self.final_only and (self.detokenizer is None or not self.detokenizer.stop)


class OutputProcessor:
    """Holds per-request text state. Child requests (one per sample of n) map to (parent, index).

    prompt_logprobs are computed by a request's first sample only (see
    SamplingParams.clone_for_child); once whole they are decoded once, and every sample's first
    output carries them.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._children: dict[str, _ChildState] = {}
        self.parent_to_children: dict[str, list[str]] = {}
        # parent id -> the sample that computes its prompt logprobs, until they are decoded
        self._prompt_logprobs_source: dict[str, Request] = {}
        self._prompt_logprobs: dict[str, PromptLogprobs] = {}  # parent id -> decoded

    def add(self, parent_id: str, index: int, req: Request,
            wants_prompt_logprobs: bool = False) -> None:
        """Track one sample of a request. `wants_prompt_logprobs` says the request asked for them;
        the sample whose Request computes them (`req.prompt_logprobs` is not None) is their source."""
        detok = None
        if self.tokenizer is not None:
            p = req.sampling_params
            detok = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, skip_special_tokens=p.skip_special_tokens,
                stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output,
                min_tokens=p.min_tokens)
        final_only = req.sampling_params.output_kind == RequestOutputKind.FINAL_ONLY
        self._children[req.req_id] = _ChildState(parent_id, index, detok, wants_prompt_logprobs,
                                                 final_only)
        self.parent_to_children.setdefault(parent_id, []).append(req.req_id)
        if req.prompt_logprobs is not None:
            self._prompt_logprobs_source[parent_id] = req

    def remove(self, req_id: str) -> None:
        state = self._children.pop(req_id, None)
        if state is None:
            return
        siblings = self.parent_to_children.get(state.parent_id)
        if siblings is not None:
            siblings.remove(req_id)
            if not siblings:
                del self.parent_to_children[state.parent_id]
                self._prompt_logprobs_source.pop(state.parent_id, None)
                self._prompt_logprobs.pop(state.parent_id, None)

    def _take_prompt_logprobs(self, state: _ChildState) -> PromptLogprobs | None:
        """The request's prompt logprobs for this sample's output, once they are whole."""
        if not state.awaits_prompt_logprobs:
            return None
        out = self._prompt_logprobs.get(state.parent_id)
        if out is None:
            source = self._prompt_logprobs_source.get(state.parent_id)
            # The first sample is scheduled ahead of its siblings, so its prompt logprobs are whole
            # by any sample's first token; were they not, a later output carries them.
            if source is None or source.prompt_logits_start is not None:
                return None
            out = self._decode_prompt_logprobs(source)
            self._prompt_logprobs[state.parent_id] = out
            del self._prompt_logprobs_source[state.parent_id]
        state.awaits_prompt_logprobs = False
        return out

    def _decode_prompt_logprobs(self, req: Request) -> PromptLogprobs:
        """Rows -> vLLM's shape: None for the first prompt token, then {token_id: Logprob} with the
        prompt token first (its true rank) and the top-k after it."""
        rows = req.prompt_logprobs or []
        prompt = req.prompt_token_ids
        text: dict[int, str | None] = {}
        if self.tokenizer is not None:
            ids = sorted({t for _, _, top in rows for t, _ in top} | set(prompt[1:]))
            text = dict(zip(ids, decode_logprob_tokens(self.tokenizer, ids)))
        out: PromptLogprobs = [None]
        for token_id, (lp, rank, top) in zip(prompt[1:], rows):
            entry = {token_id: Logprob(lp, rank, text.get(token_id))}
            for r, (t, v) in enumerate(top, start=1):
                if t not in entry:
                    entry[t] = Logprob(v, r, text.get(t))
            out.append(entry)
        return out

    def process(self, update: TokenUpdate) -> tuple[RequestOutput | None, str | None]:
        """Make the output for one update: a delta, or for a final-only request None until it
        finishes. Returns it and the stop string matched, if any; the caller then finishes the
        request (the output is already marked finished)."""
        req = update.req
        state = self._children[req.req_id]
        wants_logprobs = req.sampling_params.logprobs is not None
        if state.final_only:
            state.token_ids += update.new_token_ids
            if wants_logprobs and update.new_logprobs:
                state.logprobs += update.new_logprobs
            if state.decodes_at_end and not update.finished:
                return None, None
        text, stop_str = "", None
        # an EOS or stop token ends the text without being decoded into it
        stop_token = update.finished and req.status == RequestStatus.FINISHED_STOPPED
        if state.decodes_at_end:
            if state.detokenizer is not None:
                text = state.detokenizer.decode_all(state.token_ids, stop_terminated=stop_token)
        elif state.detokenizer is not None:
            text, stop_str = state.detokenizer.update(update.new_token_ids,
                                                      stop_terminated=stop_token)
            if update.finished and stop_str is None:
                text += state.detokenizer.flush()
        finished = update.finished or stop_str is not None
        if stop_str is not None:
            req.stop_reason = stop_str
        if state.final_only:
            if not finished:
                return None, None
            token_ids, logprobs = state.token_ids, state.logprobs
            if state.detokenizer is not None and not state.decodes_at_end:
                text = state.detokenizer.output_text  # every delta so far, this one included
        else:
            token_ids, logprobs = update.new_token_ids, update.new_logprobs
        out = RequestOutput(
            request_id=state.parent_id, index=state.index, prompt_token_ids=req.prompt_token_ids,
            new_token_ids=token_ids, new_text=text,
            new_logprobs=logprobs if wants_logprobs else None,
            prompt_logprobs=self._take_prompt_logprobs(state), finished=finished,
            finish_reason="stop" if stop_str is not None else (req.status.finish_reason if finished else None),
            stop_reason=req.stop_reason, num_output_tokens=req.num_output_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0))
        return out, stop_str

    def finished_early(self, req: Request) -> RequestOutput:
        """The last output of a request that ended outside a step's tokens: aborted ("abort") or
        failed in the engine ("error"). A delta is empty; a final-only output has the tokens and
        text so far."""
        state = self._children[req.req_id]
        token_ids, text, logprobs = [], "", None
        if state.final_only:
            token_ids = state.token_ids
            if req.sampling_params.logprobs is not None:
                logprobs = state.logprobs
            if state.detokenizer is not None:
                text = (state.detokenizer.decode_all(token_ids) if state.decodes_at_end
                        else state.detokenizer.output_text + state.detokenizer.flush())
        return RequestOutput(
            request_id=state.parent_id, index=state.index, prompt_token_ids=req.prompt_token_ids,
            new_token_ids=token_ids, new_text=text, new_logprobs=logprobs, finished=True,
            finish_reason=req.status.finish_reason, num_output_tokens=req.num_output_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0))
