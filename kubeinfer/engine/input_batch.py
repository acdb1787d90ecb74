"""The model runner's persistent batch: each request's token ids, block table and sampling state,
kept across steps, and the flat host arrays of one step built from it.

The scheduler sends a request whole once (`NewRequestData`) and afterwards only the diff; this batch
holds what that adds up to, on every rank alike. The runner appends each sampled token itself: a
PLACEHOLDER when the step is launched, the id once the step's results reach the host (async
scheduling reads them a step late; a step's inputs at a placeholder are filled on the device from
the previous step's samples).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kubeinfer.engine.attention_spans import token_bounds
from kubeinfer.engine.forward_context import AttentionArrays, build_attention_arrays
from kubeinfer.engine.mrope_positions import MRopePositions, step_positions
from kubeinfer.engine.request import PLACEHOLDER
from kubeinfer.engine.sampling_params import SamplingParams
from kubeinfer.engine.scheduler_output import NewRequestData


@dataclass
class CachedRequestState:
    """One request as the runner holds it. Attribute names match `Request` where they overlap, so
    `SamplingMetadata.build` reads either."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int
    prompt_logits_start: int | None = None  # see Request.prompt_logits_start
    # M-RoPE models (mrope_positions.py): the prompt's [3, P] ids (None: plain positions) and the
    # offset of every later position
    mrope_positions: np.ndarray | None = None
    mrope_delta: int = 0
    bidir_spans: tuple[tuple[int, int], ...] = ()  # see Request.bidir_spans

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)
        # The step's sampling metadata turns these into int64 ids and float32 values for the whole
        # batch; refuse what is neither here, where the failure is this request's alone.
        p = self.sampling_params
        for t, b in (p.logit_bias or {}).items():
            int(t), float(b)
        for t in p.stop_token_ids or ():
            int(t)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> int:
        """Append a token (PLACEHOLDER while its step runs); returns its output index."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        return len(self.output_token_ids) - 1

    def set_output_token(self, index: int, token_id: int) -> None:
        self.output_token_ids[index] = token_id
        self.all_token_ids[self.num_prompt_tokens + index] = token_id


@dataclass
class StepInputs:
    """Host-side arrays of one step; the runner copies them to the device (or into graph buffers)."""

    req_ids: list[str]  # the R requests in batch order
    input_ids: np.ndarray  # [T] int64; PLACEHOLDER where the previous step's sample goes
    attn: AttentionArrays  # positions, slot mapping, query starts, seq lens, block tables
    logits_indices: np.ndarray  # [S] int64: the last token of each request that samples
    sample_states: list[CachedRequestState]  # the S requests that sample, in batch order
    # prompt_logprobs: the tokens whose logits predict a prompt token, for the requests that asked
    # and still need them; None in a step with none (the usual case)
    prompt_logits_indices: np.ndarray | None = None  # [Q] int64, into the step's tokens
    prompt_target_ids: np.ndarray | None = None  # [Q] int64: the prompt token each one predicts
    # (req_id, top-k asked, first position, number of positions) for each such request, in Q order
    prompt_logprobs_reqs: list[tuple[str, int, int, int]] | None = None
    mrope_positions: np.ndarray | None = None  # [3, T] int64 for an M-RoPE model, else None

    @property
    def rope_positions(self) -> np.ndarray:
        """The position ids the model's rotary takes: [3, T] under M-RoPE, else [T]."""
        return self.attn.positions if self.mrope_positions is None else self.mrope_positions

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    @property
    def positions(self) -> np.ndarray:
        return self.attn.positions

    @property
    def slot_mapping(self) -> np.ndarray:
        return self.attn.slot_mapping

    @property
    def seq_lens(self) -> np.ndarray:
        return self.attn.seq_lens

    @property
    def block_tables(self) -> np.ndarray:
        return self.attn.block_tables

    @property
    def query_start_loc(self) -> np.ndarray:
        return self.attn.query_start_loc

    @property
    def is_pure_decode(self) -> bool:
        """Every request computes exactly one token and samples: the CUDA-graph case."""
        return self.attn.max_query_len == 1 and len(self.sample_states) == self.num_reqs


class InputBatch:
    """The requests the runner holds, by id."""

    def __init__(self, block_size: int, mrope: MRopePositions | None = None):
        self.block_size = block_size
        self.mrope = mrope  # set for an M-RoPE model: each request gets its 3-D positions
        self.states: dict[str, CachedRequestState] = {}

    def add_request(self, new: NewRequestData) -> CachedRequestState:
        """Hold a new (or resumed) request. Raises if its data cannot be prepared; the caller
        fails that request alone."""
        state = CachedRequestState(
            req_id=new.req_id, prompt_token_ids=new.prompt_token_ids,
            output_token_ids=list(new.output_token_ids), sampling_params=new.sampling_params,
            eos_token_ids=new.eos_token_ids, block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            prompt_logits_start=new.prompt_logits_start, bidir_spans=tuple(new.bidir_spans))
        if self.mrope is not None:
            state.mrope_positions, state.mrope_delta = self.mrope.prompt_positions(
                len(new.prompt_token_ids), new.mm_features)
        self.states[new.req_id] = state
        return state

    def remove_request(self, req_id: str) -> CachedRequestState | None:
        return self.states.pop(req_id, None)

    def prepare(self, num_scheduled_tokens: dict[str, int], min_table_width: int = 0) -> StepInputs:
        """The step's arrays: each request's next num_scheduled_tokens[req_id] tokens, laid end to
        end in the order given. Advances each request's prompt-logprobs position."""
        # Plain lists first and one numpy conversion each: per-row numpy writes cost more in Python.
        ids: list[int] = []
        starts, query_lens, tables = [], [], []
        logits_indices: list[int] = []
        sample_states = []
        prompt_indices: list[int] = []
        prompt_targets: list[int] = []
        prompt_reqs: list[tuple[str, int, int, int]] = []
        offset = 0
        for req_id, n in num_scheduled_tokens.items():
            state = self.states[req_id]
            start = state.num_computed_tokens
            if state.prompt_logits_start is not None:
                _add_prompt_logits(state, start, n, offset, prompt_indices, prompt_targets,
                                   prompt_reqs)
            if n == 1:
                ids.append(state.all_token_ids[start])
            else:
                ids.extend(state.all_token_ids[start:start + n])
            starts.append(start)
            query_lens.append(n)
            tables.append(state.block_ids)
            offset += n
            if start + n == state.num_tokens:
                logits_indices.append(offset - 1)
                sample_states.append(state)
        attn = build_attention_arrays(starts, query_lens, tables, self.block_size, min_table_width)
        spans = [self.states[r].bidir_spans for r in num_scheduled_tokens]
        if any(spans):
            bounds = token_bounds(spans, starts, query_lens)
            if bounds is not None:
                attn.span_lo, attn.span_hi = bounds
        inputs = StepInputs(req_ids=list(num_scheduled_tokens), input_ids=np.array(ids, dtype=np.int64),
                            attn=attn, logits_indices=np.asarray(logits_indices, dtype=np.int64),
                            sample_states=sample_states)
        if self.mrope is not None:
            states = [self.states[r] for r in num_scheduled_tokens]
            inputs.mrope_positions = step_positions(
                attn.positions, starts, query_lens, [s.mrope_positions for s in states],
                [s.mrope_delta for s in states])
        if prompt_reqs:
            inputs.prompt_logits_indices = np.asarray(prompt_indices, dtype=np.int64)
            inputs.prompt_target_ids = np.asarray(prompt_targets, dtype=np.int64)
            inputs.prompt_logprobs_reqs = prompt_reqs
        return inputs

    def holes(self, inputs: StepInputs) -> tuple[np.ndarray, list[str]]:
        """Token indices still PLACEHOLDER (the previous step's samples) and the request of each."""
        holes = np.flatnonzero(inputs.input_ids == PLACEHOLDER)
        if not len(holes):
            return holes, []
        req_of_token = np.repeat(np.arange(inputs.num_reqs), np.diff(inputs.query_start_loc))
        return holes, [inputs.req_ids[r] for r in req_of_token[holes]]


def _add_prompt_logits(state: CachedRequestState, start: int, n: int, offset: int,
                       indices: list[int], targets: list[int],
                       reqs: list[tuple[str, int, int, int]]) -> None:
    """Positions of this chunk [start, start + n) whose logits prompt_logprobs needs: from the
    first not yet computed up to the second-to-last prompt token (the last one's logits sample).
    Every prompt token is known on the host, so the one that the chunk's last position predicts
    is taken from the prompt even when the next chunk computes it."""
    lo = max(start, state.prompt_logits_start)
    hi = min(start + n, state.num_prompt_tokens - 1)
    if lo >= hi:
        return
    indices.extend(range(offset + lo - start, offset + hi - start))
    targets.extend(state.prompt_token_ids[lo + 1:hi + 1])
    reqs.append((state.req_id, state.sampling_params.prompt_logprobs, lo, hi - lo))
    state.prompt_logits_start = hi if hi < state.num_prompt_tokens - 1 else None
