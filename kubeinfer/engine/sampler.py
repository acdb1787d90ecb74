"""Turn one step's logits into token ids, batched over every request that samples this step.

Order, as in vLLM v1: min_tokens stop-token masking -> penalties -> (greedy rows: argmax) ->
temperature -> min_p -> top_k/top_p -> an exponential-race draw. Everything runs as batched tensor
ops on the logits' device; the only host sync is the one transfer of the results at the end. Work a
batch does not need (penalties, min_p, top-k/top-p, logprobs, the draw itself when all rows are
greedy) is skipped on flags that `SamplingMetadata.build` computes on the host.

Logprobs are those of the RAW model distribution, log_softmax of the logits before any masking,
penalty or temperature: vLLM v1's default (`logprobs_mode=raw_logprobs`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kubeinfer.engine.outputs import PromptLogprobsRow, SampleLogprobs
from kubeinfer.engine.sampling_params import SamplingParams

_GREEDY_EPS = 1e-5  # same threshold as SamplingParams.is_greedy


@dataclass
class SamplingMetadata:
    """The sampling parameters of one step as batched tensors, row i for reqs[i].

    An optional tensor that is None means no row uses that feature, and the step skips its work.
    Token-id tensors are padded with -1; ids outside [0, vocab) are ignored on the device.
    """

    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows so dividing by it is safe
    is_greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    all_random: bool
    top_p: torch.Tensor | None = None  # [B] float32
    top_k: torch.Tensor | None = None  # [B] int64, 0 = off
    min_p: torch.Tensor | None = None  # [B] float32
    # penalties: all three set when any row penalizes
    presence_penalty: torch.Tensor | None = None  # [B] float32
    frequency_penalty: torch.Tensor | None = None  # [B] float32
    repetition_penalty: torch.Tensor | None = None  # [B] float32
    output_token_ids: torch.Tensor | None = None  # [B, L] int64, padded with -1
    # prompt ids only of rows with repetition_penalty != 1; None when no row has one
    prompt_token_ids: torch.Tensor | None = None  # [B, P] int64, padded with -1
    # min_tokens: (row, token) pairs to mask to -inf
    stop_mask_rows: torch.Tensor | None = None  # [M] int64
    stop_mask_token_ids: torch.Tensor | None = None  # [M] int64
    # logit_bias: (row, token, bias) triples added to the logits
    bias_rows: torch.Tensor | None = None  # [K] int64
    bias_token_ids: torch.Tensor | None = None  # [K] int64
    bias_values: torch.Tensor | None = None  # [K] float32
    # (row, req_id, seed) of every non-greedy row with a seed; each draws from its own generator
    seeded_rows: list[tuple[int, str, int]] = field(default_factory=list)
    num_logprobs: list[int | None] = field(default_factory=list)  # per row, as asked
    max_num_logprobs: int | None = None  # None when no row asks for logprobs

    @property
    def num_reqs(self) -> int:
        return self.temperature.shape[0]

    @property
    def is_reusable(self) -> bool:
        """True when nothing here changes from step to step for the same requests: no penalties
        (their token counts grow) and no min_tokens masks (they lift)."""
        return self.presence_penalty is None and self.stop_mask_rows is None

    @classmethod
    def build(cls, reqs: list, device: torch.device | str) -> "SamplingMetadata":
        """Build the step's metadata from the requests that sample, in logits-row order: the
        runner's `CachedRequestState`s (or `Request`s: both have the fields read here).

        One host-to-device copy for all per-row scalars, plus one per id tensor a feature needs.
        """
        device = torch.device(device)
        params = [r.sampling_params for r in reqs]
        is_greedy = [p.temperature < _GREEDY_EPS for p in params]
        scalars = np.array(
            [[p.temperature for p in params], [p.top_p for p in params],
             [p.top_k for p in params], [p.min_p for p in params],
             [p.presence_penalty for p in params], [p.frequency_penalty for p in params],
             [p.repetition_penalty for p in params]], dtype=np.float32).reshape(7, len(reqs))
        temp, top_p, top_k, min_p, presence, frequency, repetition = _to_device(scalars, device)
        # Greedy rows ignore every sampling knob below; leaving them out keeps flags tight.
        sampled = [(p, g) for p, g in zip(params, is_greedy) if not g]
        has_top_p = any(p.top_p < 1.0 for p, _ in sampled)
        has_top_k = any(p.top_k > 0 for p, _ in sampled)
        has_min_p = any(p.min_p > 0.0 for p, _ in sampled)
        # Penalties change the greedy argmax too, so every row counts here.
        has_penalties = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                            or p.repetition_penalty != 1.0 for p in params)
        has_repetition = any(p.repetition_penalty != 1.0 for p in params)

        meta = cls(
            temperature=torch.where(temp < _GREEDY_EPS, torch.ones_like(temp), temp),
            is_greedy=temp < _GREEDY_EPS,
            all_greedy=all(is_greedy),
            all_random=bool(reqs) and not any(is_greedy),
            top_p=top_p if has_top_p else None,
            top_k=top_k.long() if has_top_k else None,
            min_p=min_p if has_min_p else None,
        )
        if has_penalties:
            meta.presence_penalty = presence
            meta.frequency_penalty = frequency
            meta.repetition_penalty = repetition
            meta.output_token_ids = _to_device(_pad([r.output_token_ids for r in reqs]), device)
            if has_repetition:
                prompts = [r.prompt_token_ids if r.sampling_params.repetition_penalty != 1.0 else []
                           for r in reqs]
                meta.prompt_token_ids = _to_device(_pad(prompts), device)

        rows, ids = [], []
        for i, (r, p) in enumerate(zip(reqs, params)):
            if r.num_output_tokens < p.min_tokens:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
                stop_ids = sorted(t for t in stop_ids if t >= 0)
                rows += [i] * len(stop_ids)
                ids += stop_ids
        if rows:
            pairs = _to_device(np.array([rows, ids], dtype=np.int64), device)
            meta.stop_mask_rows, meta.stop_mask_token_ids = pairs[0], pairs[1]

        biases = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        if biases:
            triples = np.array(biases, dtype=np.float64).T
            meta.bias_rows, meta.bias_token_ids = _to_device(triples[:2].astype(np.int64), device)
            meta.bias_values = _to_device(triples[2].astype(np.float32), device)

        meta.seeded_rows = [(i, r.req_id, p.seed) for i, (r, p, g) in
                            enumerate(zip(reqs, params, is_greedy)) if p.seed is not None and not g]
        meta.num_logprobs = [p.logprobs for p in params]
        asked = [n for n in meta.num_logprobs if n is not None]
        meta.max_num_logprobs = max(asked) if asked else None
        return meta


@dataclass
class SamplerOutput:
    """Host-side results of one step, row i for request i of the metadata.

    `logprobs[i]` is (sampled token's logprob, [(token_id, logprob)] of the row's top-N, most likely
    first), None for rows that did not ask; `logprobs` is None when no row asked.
    """

    sampled_token_ids: list[int]
    logprobs: list[SampleLogprobs | None] | None = None


class Sampler:
    """Samples one token per row. Holds the per-request generators of seeded requests.

    A seeded request's generator lives from its first sampled step until `free(req_id)`, so its
    stream continues across steps and does not depend on which other requests share the batch.
    """

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def add_request(self, req_id: str, params: SamplingParams, device: torch.device) -> None:
        """Prepare a request's sampling state as it joins the batch: a seeded request's generator
        (kept when it exists, so a request resumed after preemption continues its stream)."""
        if params.seed is not None and params.temperature >= _GREEDY_EPS:
            self._generator(req_id, params.seed, device)

    def free(self, req_id: str) -> None:
        """Forget a finished or aborted request's generator. Unknown ids are ignored."""
        self._generators.pop(req_id, None)

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row of `logits` [B, V] (B == meta.num_reqs).

        Greedy rows take the argmax of the penalized logits (ties -> lowest id); the rest draw.
        """
        return unpack(pack(*self.sample(logits, meta), meta).tolist(), meta)

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata,
               generators: list[torch.Generator] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The device half: sampled ids [B] and, when asked for, raw logprobs [B, V]. No sync.
        `generators` (from `generators_for`, one per meta.seeded_rows entry): the seeded rows'
        generators as they were bound earlier, for a step sampled after the batch moved on."""
        logits = logits.float()
        raw_logprobs = None if meta.max_num_logprobs is None else logits.log_softmax(dim=-1)
        if meta.stop_mask_rows is not None:
            logits = mask_tokens(logits, meta.stop_mask_rows, meta.stop_mask_token_ids)
        if meta.bias_rows is not None:
            logits = logits.index_put((meta.bias_rows, meta.bias_token_ids), meta.bias_values,
                                      accumulate=True)
        if meta.presence_penalty is not None:
            logits = apply_penalties(logits, meta)
        greedy = None if meta.all_random else logits.argmax(dim=-1)
        if meta.all_greedy:
            sampled = greedy
        else:
            drawn = self._draw(logits, meta, generators)
            sampled = drawn if greedy is None else torch.where(meta.is_greedy, greedy, drawn)
        return sampled, raw_logprobs

    def _draw(self, logits: torch.Tensor, meta: SamplingMetadata,
              generators: list[torch.Generator] | None) -> torch.Tensor:
        logits = logits / meta.temperature.unsqueeze(1)
        if meta.min_p is not None:
            logits = apply_min_p(logits, meta.min_p)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) is a draw from p, and unlike
        # torch.multinomial it never syncs with the host.
        q = torch.empty_like(probs).exponential_()
        if generators is None:
            generators = self.generators_for(meta, probs.device)
        for (row, _, _), gen in zip(meta.seeded_rows, generators):
            q[row].exponential_(generator=gen)
        return probs.div_(q).argmax(dim=-1)

    def generators_for(self, meta: SamplingMetadata, device: torch.device
                       ) -> list[torch.Generator]:
        """The generator of each of meta's seeded rows, now: a step sampled later (its grammar
        rows still filling) keeps these, though the batch may meanwhile free a finished
        request's generator or give its id to a new request."""
        return [self._generator(req_id, seed, device) for _, req_id, seed in meta.seeded_rows]

    def _generator(self, req_id: str, seed: int, device: torch.device) -> torch.Generator:
        gen = self._generators.get(req_id)
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            self._generators[req_id] = gen
        return gen


def mask_tokens(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Set logits[rows[j], token_ids[j]] to -inf; ids >= vocab are ignored, without a host sync."""
    num_reqs, vocab = logits.shape
    mask = torch.zeros(num_reqs, vocab + 1, dtype=torch.bool, device=logits.device)
    # index_fill_ on the flat view: `mask[rows, ids] = True` would sync on CUDA.
    mask.view(-1).index_fill_(0, rows * (vocab + 1) + token_ids.clamp(max=vocab), True)
    return logits.masked_fill(mask[:, :vocab], float("-inf"))


def token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, L] ids padded with -1 -> [B, vocab] float32 counts (out-of-range ids dropped)."""
    ids = torch.where((ids < 0) | (ids >= vocab), vocab, ids)
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """vLLM's penalties. Repetition (HF/CTRL): logits of tokens seen in the prompt or the output are
    divided by the penalty when positive and multiplied when not. Frequency and presence (OpenAI):
    subtract `frequency * count` and `presence * (count > 0)` over output tokens only.
    """
    vocab = logits.shape[1]
    counts = token_counts(meta.output_token_ids, vocab)
    in_output = counts > 0
    if meta.prompt_token_ids is not None:
        seen = in_output | (token_counts(meta.prompt_token_ids, vocab) > 0)
        penalty = torch.where(seen, meta.repetition_penalty.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - meta.frequency_penalty.unsqueeze(1) * counts
    return logits - meta.presence_penalty.unsqueeze(1) * in_output


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep each row's k best tokens (0 = all; ties with the k-th are kept), then the smallest set
    of the most likely whose probability reaches top_p. One ascending sort serves both."""
    vocab = logits.shape[1]
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth_best = logits_sort.gather(1, (vocab - k).unsqueeze(1))
        logits_sort = logits_sort.masked_fill(logits_sort < kth_best, float("-inf"))
    if top_p is not None:
        cum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
        # Drop the least likely tokens while their total stays within 1 - p; the best one stays.
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        logits_sort = logits_sort.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, logits_idx, logits_sort)


def pack(sampled: torch.Tensor, raw_logprobs: torch.Tensor | None,
         meta: SamplingMetadata) -> torch.Tensor:
    """Everything the host needs from a step in one tensor, for one device-to-host transfer: the ids,
    then (when asked) each sampled token's logprob and the top-N ids and logprobs."""
    if raw_logprobs is None:
        return sampled
    n = min(meta.max_num_logprobs, raw_logprobs.shape[1])
    parts = [sampled.unsqueeze(1).double(), raw_logprobs.gather(1, sampled.unsqueeze(1)).double()]
    if n > 0:
        top_lp, top_ids = raw_logprobs.topk(n, dim=-1)
        parts += [top_ids.double(), top_lp.double()]  # float64 holds any token id exactly
    return torch.cat(parts, dim=1)


def unpack(rows: list, meta: SamplingMetadata) -> SamplerOutput:
    """The host half: `pack`'s tensor, as a list, into ids and per-row logprobs."""
    if meta.max_num_logprobs is None:
        return SamplerOutput(sampled_token_ids=rows)
    n = (len(rows[0]) - 2) // 2 if rows else 0
    ids, logprobs = [], []
    for row, num in zip(rows, meta.num_logprobs):
        ids.append(int(row[0]))
        if num is None:
            logprobs.append(None)
            continue
        num = min(num, n)
        top = [(int(t), lp) for t, lp in zip(row[2:2 + num], row[2 + n:2 + n + num])]
        logprobs.append((row[1], top))
    return SamplerOutput(sampled_token_ids=ids, logprobs=logprobs)


def prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, k: int) -> torch.Tensor:
    """The device half of prompt_logprobs: for logits [Q, V] at prompt positions and the prompt
    token each one predicts [Q], a [Q, 2 + 2k] float64 tensor of that token's raw logprob, its rank
    (1 = most likely; tied tokens share the worse rank, as vLLM counts), the top-k ids and their
    logprobs. Raw log_softmax in float32, as the sampled tokens' logprobs."""
    logprobs = logits.float().log_softmax(dim=-1)
    k = min(k, logprobs.shape[1])
    target_lp = logprobs.gather(1, target_ids.unsqueeze(1))
    rank = (logprobs >= target_lp).sum(dim=-1, keepdim=True)
    parts = [target_lp.double(), rank.double()]
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        parts += [top_ids.double(), top_lp.double()]  # float64 holds any token id exactly
    return torch.cat(parts, dim=1)


def unpack_prompt_logprobs(rows: list, reqs: list[tuple[str, int, int, int]]
                           ) -> dict[str, tuple[int, list[PromptLogprobsRow]]]:
    """The host half: `prompt_logprobs`' rows, as a list, into each request's (first position,
    [(logprob, rank, [(token_id, logprob)] top-k)]), the top-k cut to what the request asked.
    `reqs` holds (req_id, top-k asked, first position, number of rows) in row order."""
    k_max = (len(rows[0]) - 2) // 2 if rows else 0
    out = {}
    i = 0
    for req_id, k_asked, first, num in reqs:
        k = min(k_asked, k_max)
        out[req_id] = (first, [
            (row[0], int(row[1]),
             [(int(t), lp) for t, lp in zip(row[2:2 + k], row[2 + k_max:2 + k_max + k])])
            for row in rows[i:i + num]])
        i += num
    return out


def _pad(rows: list[list[int]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _to_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(arr)
    if device.type == "cuda":
        t = t.pin_memory()  # lets the copy run asynchronously with the host
        return t.to(device, non_blocking=True)
    return t.to(device)
