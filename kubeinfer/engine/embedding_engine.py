"""The pooling runner's engine: queued embedding requests -> padded batches -> one vector each
(an embedding, or a sequence classifier's class probabilities).

It keeps the step contract of `LLMEngine` (add_request / abort_request / has_unfinished_requests /
step / validate_request), so `AsyncLLM` and its background thread drive it unchanged. An encoder
reads its whole input in one forward pass and keeps nothing afterwards, so there is no KV cache and
no scheduler state: each step takes the oldest waiting requests, as many as fit in
--max-num-seqs rows and --max-num-batched-tokens padded tokens (rows x the longest row), runs
them as one right-padded batch and returns every one of them finished.

The model is any pooling model of `models/` (BERT, RoBERTa/XLM-R, a decoder through
`decoder_pooling`): forward(input_ids [B, L], mask [B, L]) -> hidden [B, L, H]. A model with
classify() is a classifier and serves the "classify" task only; the others serve "embed".
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from kubeinfer.engine import cpu_threads
from kubeinfer.engine.loader.hf_config import get_max_model_len, load_tokenizer
from kubeinfer.engine.loader.model import load_model
from kubeinfer.engine.loader.resolve import resolve_model
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.outputs import ClassificationOutput, EmbeddingOutput
from kubeinfer.engine.pooling import (PoolerConfig, class_probabilities, load_pooler_config,
                                     pool)
from kubeinfer.engine.pooling_params import PoolingParams
from kubeinfer.engine.stats import (FinishedRequestStats, IterationStats, SchedulerStats,
                                    StatLogger)

logger = logging.getLogger(__name__)


@dataclass
class _Waiting:
    request_id: str
    prompt_token_ids: list[int]
    params: PoolingParams
    arrival_time: float


class EmbeddingEngine:
    runner_type = "pooling"  # LLMEngine's is "generate"

    def __init__(self, config: EngineConfig, stat_loggers: list[StatLogger] | tuple = ()):
        if config.parallel.tensor_parallel_size != 1:
            raise ConfigError(f"--tensor-parallel-size={config.parallel.tensor_parallel_size} is "
                              "not supported for embedding models, which fit on one device; "
                              "use --tensor-parallel-size 1.")
        if config.parallel.pipeline_parallel_size != 1:
            raise ConfigError(f"--pipeline-parallel-size={config.parallel.pipeline_parallel_size} "
                              "is not supported for embedding models, which fit on one device; "
                              "use --pipeline-parallel-size 1.")
        self.device = torch.device(config.device.resolve())
        cpu_threads.configure(self.device)
        self.config = config
        self.stat_loggers = list(stat_loggers)
        torch.manual_seed(config.model.seed)
        path = resolve_model(config.model)
        self.model, self.hf_config = load_model(config.model, self.device, path=path,
                                                             runner="pooling")
        self.task = "classify" if hasattr(self.model, "classify") else "embed"
        self.max_model_len = _max_model_len(path, self.hf_config, config.model.max_model_len,
                                            getattr(self.model, "position_offset", 0))
        self.tokenizer = None
        if not config.model.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(path, config.model)
        self.vocab_size = self.hf_config.vocab_size
        self.hidden_size = self.hf_config.hidden_size
        self.pad_token_id = getattr(self.hf_config, "pad_token_id", None) or 0
        # a classifier pools in its own head; sentence-transformers files describe embeddings
        self.pooler = (load_pooler_config(path, dict(config.model.pooler_config),
                                          getattr(self.model, "default_pooling_type", "CLS"))
                       if self.task == "embed" else PoolerConfig())
        reserve_cache = getattr(self.model, "reserve_cache", None)
        if reserve_cache is not None:  # a decoder's scratch KV cache, sized for the largest step
            limits = config.scheduler
            reserve_cache(max(limits.max_num_batched_tokens, self.max_model_len),
                          limits.max_num_seqs)
        self.default_sampling: dict[str, float] = {}
        self._waiting: deque[_Waiting] = deque()
        if self.task == "classify":
            logger.info("pooling runner: %s, a classifier of %d labels; max_model_len %d",
                        type(self.model).__name__, self.model.num_labels, self.max_model_len)
        else:
            logger.info("pooling runner: %s pooling, normalize=%s (%s); embedding size %d, "
                        "max_model_len %d", self.pooler.pooling_type, self.pooler.normalize,
                        self.pooler.source, self.hidden_size, self.max_model_len)

    def shutdown(self) -> None:
        pass  # one device, no worker processes

    # ---- inputs --------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int], truncate_prompt_tokens: int | None = None,
                 add_special_tokens: bool = True) -> list[int]:
        """Token ids of one input, truncated as vLLM's `truncate_prompt_tokens` asks: text through
        the tokenizer (keeping its special tokens), token ids by keeping the last k; -1 means
        max_model_len. Raises RequestError for a value that cannot work."""
        k = truncate_prompt_tokens
        if k is not None:
            if k == -1:
                k = self.max_model_len
            elif k < 1:
                raise RequestError(f"truncate_prompt_tokens must be -1 (the model's maximum, "
                                   f"{self.max_model_len}) or at least 1, got {k}.",
                                   "truncate_prompt_tokens")
            elif k > self.max_model_len:
                raise RequestError(f"truncate_prompt_tokens ({k}) is greater than the model's "
                                   f"maximum context length ({self.max_model_len}); choose a "
                                   "smaller value or -1.", "truncate_prompt_tokens")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this server was started with --skip-tokenizer-init, so it "
                                   "takes token ids only: send `input` as lists of token ids.",
                                   "input")
            if k is None:
                return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens,
                                         truncation=True, max_length=k)
        ids = list(prompt)
        return ids[-k:] if k is not None else ids

    def validate_request(self, prompt_token_ids: list[int], params: PoolingParams,
                         label: str = "input") -> None:
        """Check one input against the model's limits; `label` names it in the message ("input",
        "input[2]"). Reads only immutable state, so any thread may call it."""
        self._check_task(params)
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError(f"{label} is empty: send a non-empty string or at least one token "
                               "id.", "input")
        bad = next((t for t in prompt_token_ids
                    if isinstance(t, bool) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} in {label} is out of range: the vocabulary has "
                               f"{self.vocab_size} tokens (ids 0..{self.vocab_size - 1}).", "input")
        if n > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"{label} has {n} tokens. Please reduce the length of the input, or set "
                f"`truncate_prompt_tokens` ({self.max_model_len}, or -1 for the model's maximum) "
                "to truncate it.", "input")
        if (params.task == "embed" and params.dimensions is not None
                and params.dimensions != self.hidden_size):
            raise RequestError(
                f"dimensions={params.dimensions} is not supported: this model's embeddings have "
                f"{self.hidden_size} dimensions and it does not support matryoshka truncation. "
                f"Leave `dimensions` out or set it to {self.hidden_size}.", "dimensions")

    def _check_task(self, params: PoolingParams) -> None:
        if params.task == self.task:
            return
        arch = type(self.model).__name__
        if self.task == "classify":
            raise RequestError(f"This model ({arch}) is a sequence classifier and has no "
                               "embeddings: use /classify with it, or serve an embedding model "
                               "for /v1/embeddings.", "model")
        raise RequestError(f"This model ({arch}) is an embedding model, not a classifier: use "
                           "/v1/embeddings with it, or serve a *ForSequenceClassification model "
                           "for /classify.", "model")

    def prepare_input(self, prompt: str | list[int], params: PoolingParams,
                      truncate_prompt_tokens: int | None = None, add_special_tokens: bool = True,
                      label: str = "input") -> list[int]:
        """tokenize() then validate_request(): the token ids to queue for one input."""
        if isinstance(prompt, str) and not prompt:
            raise RequestError(f"{label} is an empty string: send some text to embed.", "input")
        ids = self.tokenize(prompt, truncate_prompt_tokens, add_special_tokens)
        self.validate_request(ids, params, label)
        return ids

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: PoolingParams | None = None, priority: int = 0) -> None:
        self.validate_priority(priority)
        params = params or PoolingParams()
        if any(w.request_id == request_id for w in self._waiting):
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        self.validate_request(prompt_token_ids, params)
        self._waiting.append(_Waiting(request_id, list(prompt_token_ids), params,
                                      time.monotonic()))

    def validate_priority(self, priority: int) -> None:
        if priority:  # every batch takes the oldest inputs; there is no order to change
            raise RequestError(f"priority={priority} is not supported for embedding models; leave "
                               "it out or 0.", "priority")

    def abort_request(self, request_id: str) -> list:
        self._waiting = deque(w for w in self._waiting if w.request_id != request_id)
        return []

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._waiting)

    def kv_cache_usage(self) -> tuple[int, int]:
        return 0, 0  # no KV cache: every batch runs whole

    # ---- the step ------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Waiting]:
        """The oldest waiting requests that fit the step's limits (always at least one)."""
        limits = self.config.scheduler
        batch: list[_Waiting] = []
        longest = 0
        while self._waiting and len(batch) < limits.max_num_seqs:
            n = len(self._waiting[0].prompt_token_ids)
            if batch and (len(batch) + 1) * max(longest, n) > limits.max_num_batched_tokens:
                break
            batch.append(self._waiting.popleft())
            longest = max(longest, n)
        return batch

    def step(self) -> list[EmbeddingOutput | ClassificationOutput]:
        batch = self._take_batch()
        if not batch:
            return []
        start = time.monotonic()
        ids = [w.prompt_token_ids for w in batch]
        if self.task == "classify":
            vectors = self.classify(ids)
            labels = [self.label_of(int(i)) for i in vectors.argmax(-1)]
        else:
            vectors = self.embed(ids, [w.params.normalize for w in batch])
        now = time.monotonic()
        num_tokens = sum(len(w.prompt_token_ids) for w in batch)
        stats = IterationStats(num_prompt_tokens=num_tokens, num_scheduled_tokens=num_tokens)
        outputs: list[EmbeddingOutput | ClassificationOutput] = []
        for i, (w, vec) in enumerate(zip(batch, vectors.tolist())):
            if self.task == "classify":
                outputs.append(ClassificationOutput(w.request_id, vec, w.prompt_token_ids,
                                                    labels[i]))
            else:
                outputs.append(EmbeddingOutput(w.request_id, vec, w.prompt_token_ids))
            stats.finished_requests.append(FinishedRequestStats(
                finish_reason="stop", e2e_latency=now - w.arrival_time,
                queue_time=start - w.arrival_time, num_prompt_tokens=len(w.prompt_token_ids),
                num_generation_tokens=0, prefill_time=now - start, max_tokens=None))
        sched = SchedulerStats(num_running_reqs=0, num_waiting_reqs=len(self._waiting))
        for stat_logger in self.stat_loggers:
            stat_logger.record(sched, stats)
        return outputs

    def _forward(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-id lists -> (hidden [B, L, H], mask [B, L]) of one right-padded forward pass."""
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.bool)
        for i, ids in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, :len(ids)] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        return self.model(input_ids, mask), mask

    def label_of(self, index: int) -> str:
        """A class's name from config.json's id2label (keys may be ints or strings), as vLLM."""
        id2label = getattr(self.hf_config, "id2label", None) or {}
        return str(id2label.get(index, id2label.get(str(index), f"LABEL_{index}")))

    @torch.inference_mode()
    def classify(self, batch: list[list[int]]) -> torch.Tensor:
        """Token-id lists -> float32 class probabilities [B, num_labels] on the CPU."""
        hidden, mask = self._forward(batch)
        return class_probabilities(self.model.classify(hidden, mask)).cpu()

    @torch.inference_mode()
    def embed(self, batch: list[list[int]], normalize: list[bool | None] | None = None
              ) -> torch.Tensor:
        """Token-id lists -> float32 embeddings [B, hidden] on the CPU, in one forward pass.

        `normalize[i]` None keeps the pooler's setting for row i."""
        hidden, mask = self._forward(batch)
        flags = [self.pooler.normalize if f is None else f for f in (normalize or [None] * len(batch))]
        out = pool(hidden, mask, replace(self.pooler, normalize=False))
        rows = torch.tensor(flags, device=out.device)
        out = torch.where(rows[:, None], F.normalize(out, p=2, dim=-1), out)
        return out.cpu()


def _max_model_len(path: Path, hf_config, max_model_len: int | None,
                   position_offset: int = 0) -> int:
    """The model's limit from config.json, less the positions the model reserves (RoBERTa's
    padding_idx + 1); without --max-model-len, also at most the sentence-transformers
    `max_seq_length` the model was trained with, as vLLM serves it."""
    limit = get_max_model_len(hf_config, None) - position_offset
    if max_model_len is not None:
        if max_model_len > limit:
            extra = (f" ({position_offset} of max_position_embeddings are reserved below the "
                     "first token)" if position_offset else "")
            raise ConfigError(f"--max-model-len ({max_model_len}) is larger than the model's "
                              f"maximum context length ({limit}{extra}). Pass --max-model-len "
                              f"{limit} or less.")
        limit = max_model_len
    st_file = Path(path) / "sentence_bert_config.json"
    if max_model_len is None and st_file.is_file():
        try:
            st_len = json.loads(st_file.read_text()).get("max_seq_length")
        except json.JSONDecodeError:
            st_len = None
        if isinstance(st_len, int) and 0 < st_len < limit:
            limit = st_len
    return limit
