"""Logprobs in the shapes OpenAI's responses use: chat's per-token list, the legacy completions
columns, the echoed prompt's, and vLLM's prompt_logprobs JSON."""
from __future__ import annotations

import math
from typing import Any, Iterable

from kubeinfer.engine.outputs import PromptLogprobs, SampleLogprobs


def _finite(x: float) -> float:
    # JSON has no -Infinity; OpenAI clients expect a number
    return max(x, -9999.0) if not math.isnan(x) else -9999.0


class TokenText:
    """Token id -> the text it stands for, cached (logprob responses ask for the same ids often)."""

    def __init__(self, tokenizer: Any, as_ids: bool = False):
        self._tokenizer = tokenizer
        # vLLM's return_tokens_as_token_ids: "token_id:123"; the only choice with no tokenizer
        self._as_ids = as_ids or tokenizer is None
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = f"token_id:{token_id}" if self._as_ids else self._tokenizer.decode([token_id])
            self._cache[token_id] = s
        return s


def chat_logprobs(token_ids: list[int], logprobs: list[SampleLogprobs],
                  text: TokenText) -> list[dict]:
    """OpenAI chat shape: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    content = []
    for tid, (lp, top) in zip(token_ids, logprobs):
        s = text(tid)
        content.append({"token": s, "logprob": _finite(lp), "bytes": list(s.encode()),
                        "top_logprobs": [{"token": text(t), "logprob": _finite(v),
                                          "bytes": list(text(t).encode())} for t, v in top]})
    return content


class CompletionLogprobs:
    """OpenAI legacy completions shape, grown one delta at a time; text_offset counts from the
    start of the choice's text (the echoed prompt included)."""

    def __init__(self, text: TokenText, offset: int = 0):
        self._text = text
        self.offset = offset

    def add(self, token_ids: Iterable[int],
            logprobs: list[SampleLogprobs | None] | None) -> dict:
        """Entries for these tokens; a None (or all of them, for None) reports null, as OpenAI does
        for an echoed prompt's first token."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for i, tid in enumerate(token_ids):
            s = self._text(tid)
            out["tokens"].append(s)
            out["text_offset"].append(self.offset)
            self.offset += len(s)
            entry = None if logprobs is None else logprobs[i]
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            lp, top = entry
            out["token_logprobs"].append(_finite(lp))
            # keyed by text, so two ids that decode alike (byte fallbacks) keep the first, and the
            # sampled token always shows its own logprob
            top_map = {s: _finite(lp)}
            for t, v in top:
                top_map.setdefault(self._text(t), _finite(v))
            out["top_logprobs"].append(top_map)
        return out


def echo_logprobs(prompt_token_ids: list[int], prompt_logprobs: PromptLogprobs | None,
                  num_top: int) -> list[SampleLogprobs | None] | None:
    """An echoed prompt's logprobs in the sampled tokens' shape, for the legacy completions
    format: None for the first token, then (its logprob, the num_top most likely)."""
    if prompt_logprobs is None:
        return None
    out: list[SampleLogprobs | None] = [None]
    for token_id, entry in zip(prompt_token_ids[1:], prompt_logprobs[1:]):
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
        out.append((entry[token_id].logprob,
                    [(t, lp.logprob) for t, lp in ranked if lp.rank <= num_top]))
    return out


def prompt_logprobs_json(prompt_logprobs: PromptLogprobs | None) -> list | None:
    """vLLM's JSON of prompt logprobs: None, then {"token_id": {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                      "decoded_token": lp.decoded_token} for t, lp in entry.items()}
            for entry in prompt_logprobs]


def merge_logprobs(into: dict | None, more: dict) -> dict:
    if into is None:
        return more
    for k, v in more.items():
        into[k].extend(v)
    return into
