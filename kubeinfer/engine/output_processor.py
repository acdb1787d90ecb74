"""Token updates -> RequestOutput deltas: detokenization, stop strings, n > 1 bookkeeping."""
from __future__ import annotations

from dataclasses import dataclass

from kubeinfer.engine.detokenizer import IncrementalDetokenizer
from kubeinfer.engine.outputs import RequestOutput
from kubeinfer.engine.request import Request, RequestStatus
from kubeinfer.engine.scheduler import TokenUpdate


@dataclass
class _ChildState:
    parent_id: str
    index: int
    detokenizer: IncrementalDetokenizer | None


class OutputProcessor:
    """Holds per-request text state. Child requests (one per sample of n) map to (parent, index)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._children: dict[str, _ChildState] = {}
        self.parent_to_children: dict[str, list[str]] = {}

    def add(self, parent_id: str, index: int, req: Request) -> None:
        detok = None
        if self.tokenizer is not None:
            p = req.sampling_params
            detok = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, skip_special_tokens=p.skip_special_tokens,
                stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output,
                min_tokens=p.min_tokens)
        self._children[req.req_id] = _ChildState(parent_id, index, detok)
        self.parent_to_children.setdefault(parent_id, []).append(req.req_id)

    def remove(self, req_id: str) -> None:
        state = self._children.pop(req_id, None)
        if state is None:
            return
        siblings = self.parent_to_children.get(state.parent_id)
        if siblings is not None:
            siblings.remove(req_id)
            if not siblings:
                del self.parent_to_children[state.parent_id]

    def process(self, update: TokenUpdate) -> tuple[RequestOutput, str | None]:
        """Make the delta for one update. Returns it and the stop string matched, if any; the
        caller then finishes the request (the delta is already marked finished)."""
        req = update.req
        state = self._children[req.req_id]
        text, stop_str = "", None
        if state.detokenizer is not None:
            # an EOS or stop token ends the text without being decoded into it
            stop_token = update.finished and req.status == RequestStatus.FINISHED_STOPPED
            text, stop_str = state.detokenizer.update(update.new_token_ids, stop_terminated=stop_token)
            if update.finished and stop_str is None:
                text += state.detokenizer.flush()
        finished = update.finished or stop_str is not None
        if stop_str is not None:
            req.stop_reason = stop_str
        out = RequestOutput(
            request_id=state.parent_id, index=state.index, prompt_token_ids=req.prompt_token_ids,
            new_token_ids=update.new_token_ids, new_text=text,
            new_logprobs=update.new_logprobs if req.sampling_params.logprobs is not None else None,
            finished=finished,
            finish_reason="stop" if stop_str is not None else (req.status.finish_reason if finished else None),
            stop_reason=req.stop_reason, num_output_tokens=req.num_output_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0))
        return out, stop_str

    def aborted(self, req: Request) -> RequestOutput:
        state = self._children[req.req_id]
        return RequestOutput(
            request_id=state.parent_id, index=state.index, prompt_token_ids=req.prompt_token_ids,
            new_token_ids=[], new_text="", finished=True, finish_reason="abort",
            num_output_tokens=req.num_output_tokens, num_cached_tokens=max(req.num_cached_tokens, 0))
