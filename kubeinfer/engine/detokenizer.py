"""Token ids -> text deltas for one request, as they are generated, with stop strings.

Two guarantees shape the deltas: a delta never ends inside a multi-byte character (tokens that stop
mid-character are held until it completes), and a delta never contains a matched stop string nor a
part of one (text that may still begin a stop string is held until the next tokens decide).

Decoding is incremental and costs O(1) amortized per token: only a short window of recent ids is
decoded, seeded with the prompt's last tokens so that leading spaces come out as in a full decode
(SentencePiece's decoders strip the first space of whatever they decode). Fast tokenizers use
`tokenizers.decoders.DecodeStream`; others the classic prefix/read-offset algorithm of vLLM.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"  # what a decoder emits for bytes that are not (yet) a whole character
_MIN_CONTEXT = 5  # prompt tokens decoded as context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
_MAX_CONTEXT = 24
_WINDOW = 8  # ids kept as context for a stream reset or a final flush


class IncrementalDetokenizer:
    """Streams one request's output text.

    Args:
        tokenizer: a transformers tokenizer (or a `tokenizers.Tokenizer`).
        prompt_token_ids: the prompt; its last tokens are decoded as context, never emitted.
        skip_special_tokens: leave special tokens (EOS, chat markers) out of the text.
        stop: stop strings; the first to appear ends the text.
        include_stop_str_in_output: keep the matched stop string at the end of the text.
        min_tokens: stop strings completed within the first `min_tokens` output tokens do not stop
            the request (vLLM's rule).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False, min_tokens: int = 0):
        backend = _backend_tokenizer(tokenizer)
        self._decoder: _StreamDecoder | _ClassicDecoder = (
            _StreamDecoder(backend, prompt_token_ids, skip_special_tokens) if backend is not None
            else _ClassicDecoder(tokenizer, prompt_token_ids, skip_special_tokens))
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        # Every proper prefix of a stop string: a text ending in one of these may become a match.
        self._stop_prefixes = {s[:k] for s in self.stop for k in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stop), default=0)
        self._held = ""  # decoded text not emitted yet because it may begin a stop string
        self._tail = ""  # the last len(longest stop) - 1 characters decoded, held text included
        self._chunks: list[str] = []
        self.num_output_tokens = 0
        self.stop_reason: str | None = None  # the matched stop string, once matched

    @property
    def is_stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def output_text(self) -> str:
        """All text emitted so far (the concatenation of every returned delta)."""
        return "".join(self._chunks)

    def update(self, new_token_ids: Sequence[int],
               stop_terminated: bool = False) -> tuple[str, str | None]:
        """Take the step's new tokens; return (text safe to emit now, matched stop string or None).

        `stop_terminated=True` says the last id is the EOS or stop token that ended the request: as
        in vLLM it is not decoded unless include_stop_str_in_output. After a stop string matched,
        further calls return ("", None).
        """
        if self.is_stopped:
            return "", None
        self.num_output_tokens += len(new_token_ids)
        if stop_terminated and not self.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        new_text = "".join(self._decoder.step(t) for t in new_token_ids)
        return self._emit(new_text, final=False)

    def decode_all(self, token_ids: Sequence[int], stop_terminated: bool = False) -> str:
        """A whole output at once, for a detokenizer without stop strings that was given no
        tokens before: one decode of the ids (with the prompt context) instead of a step per
        token. The text is what `update(token_ids, stop_terminated)` and `flush()` give together,
        except where byte-fallback pieces decoded alone turn out to be part of an invalid
        sequence: a stream has emitted them already, a whole decode writes U+FFFD for them as a
        full decode of the ids does."""
        assert not self.stop and self.num_output_tokens == 0, "decode_all needs a fresh stream"
        self.num_output_tokens = len(token_ids)
        if stop_terminated and not self.include_stop_str_in_output:
            token_ids = token_ids[:-1]
        text = self._decoder.decode_all(list(token_ids))
        if text:
            self._chunks.append(text)
        return text

    def flush(self) -> str:
        """The text still held back, for a request that finished by length, EOS or stop token.

        Tokens that never completed a character are decoded as a full decode would, with U+FFFD.
        """
        if self.is_stopped:
            return ""
        text, _ = self._emit(self._decoder.flush(), final=True)
        return text

    def _emit(self, new_text: str, final: bool) -> tuple[str, str | None]:
        # `_tail` ends with the held text and reaches back far enough to see a stop string that
        # began in text already emitted (possible only with include_stop_str_in_output).
        text = self._tail + new_text
        start = len(self._tail) - len(self._held)  # where the text not yet emitted begins
        if self.stop and self.num_output_tokens > self.min_tokens:
            match = self._find_stop(text, len(self._tail))
            if match is not None:
                pos, stop_str = match
                end = pos + len(stop_str) if self.include_stop_str_in_output else pos
                self.stop_reason = stop_str
                delta = text[start:max(start, end)]
                self._chunks.append(delta)
                return delta, stop_str
        hold = 0 if final or self.include_stop_str_in_output else self._num_to_hold(text)
        hold = min(hold, len(text) - start)  # never take back text already emitted
        delta = text[start:len(text) - hold]
        self._held = text[len(text) - hold:] if hold else ""
        self._tail = text[max(0, len(text) - self._max_hold):] if self._max_hold else ""
        if delta:
            self._chunks.append(delta)
        return delta, None

    def _find_stop(self, text: str, num_checked: int) -> tuple[int, str] | None:
        """The earliest stop string in `text` that ends past its first `num_checked` characters."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = text.find(s, max(0, num_checked - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _num_to_hold(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for k in range(min(self._max_hold, len(text)), 0, -1):
            if text[-k:] in self._stop_prefixes:
                return k
        return 0


def decode_logprob_tokens(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """Each id's own text for top-logprob lists; byte pieces render as their (lossy) string."""
    tokens = tokenizer.convert_ids_to_tokens(list(token_ids))
    return ["" if t is None else tokenizer.convert_tokens_to_string([t]) for t in tokens]


def _backend_tokenizer(tokenizer: Any) -> Any | None:
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def _prompt_context(decode, prompt_token_ids: Sequence[int]) -> list[int]:
    """The shortest prompt suffix of at least _MIN_CONTEXT tokens that decodes to whole characters."""
    ids = list(prompt_token_ids)
    for n in range(min(_MIN_CONTEXT, len(ids)), min(_MAX_CONTEXT, len(ids)) + 1):
        suffix = ids[len(ids) - n:]
        if _REPLACEMENT not in decode(suffix):
            return suffix
    return []


class _StreamDecoder:
    """Fast tokenizers: `tokenizers.decoders.DecodeStream`, prefilled with prompt context."""

    def __init__(self, backend: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool):
        self._backend = backend
        self._skip = skip_special_tokens
        self._window = _prompt_context(self._decode, prompt_token_ids)  # last ids that gave text
        self._undecoded: list[int] = []  # ids since, waiting for a character to complete
        self._reset(self._window)

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def _reset(self, context: list[int]) -> None:
        from tokenizers.decoders import DecodeStream

        self._stream = DecodeStream(skip_special_tokens=self._skip)
        for t in context:  # stepping works on every tokenizers version with DecodeStream
            self._stream.step(self._backend, t)

    def step(self, token_id: int) -> str:
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:
            # "Invalid prefix": a decoder changed text it had already produced. Start over from
            # the last ids that decoded cleanly, then from nothing.
            piece = self._restep(token_id)
        if piece is None:
            self._undecoded.append(token_id)
            return ""
        self._window = (self._window + self._undecoded + [token_id])[-_WINDOW:]
        self._undecoded = []
        return piece

    def _restep(self, token_id: int) -> str | None:
        for context in (self._window, []):
            try:
                self._reset(context)
                pieces = [self._stream.step(self._backend, t) for t in self._undecoded + [token_id]]
            except Exception:
                continue
            if pieces[-1] is None:
                return None  # the pending ids still end mid-character; keep them pending
            return "".join(p for p in pieces if p is not None)
        return None

    def decode_all(self, token_ids: list[int]) -> str:
        """What stepping through `token_ids` and flushing gives: the decode of the context and
        the ids, past the context's own text."""
        text = self._after(self._window, self._window + self._undecoded + token_ids)
        self._undecoded = []
        return text

    def _after(self, context: list[int], ids: list[int]) -> str:
        """The decode of `ids` past the text of `context` (a prefix of them). Byte-fallback
        pieces may change the context's own end (a byte that decoded alone joins an invalid
        sequence and becomes U+FFFD): then the text past their common prefix, never the
        context's text again."""
        prefix, full = self._decode(context), self._decode(ids)
        if full.startswith(prefix):
            return full[len(prefix):]
        common = 0
        for a, b in zip(prefix, full):
            if a != b:
                break
            common += 1
        return full[common:]

    def flush(self) -> str:
        if not self._undecoded:
            return ""
        text = self._after(self._window, self._window + self._undecoded)
        self._undecoded = []
        return text


class _ClassicDecoder:
    """Other tokenizers: vLLM's prefix_offset/read_offset algorithm over token strings."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip_ids = set(tokenizer.all_special_ids) if skip_special_tokens else set()
        context = [t for t in prompt_token_ids[-_MAX_CONTEXT:] if t not in self._skip_ids]
        context = _prompt_context(self._to_string, context)
        self._tokens: list[str] = self._tok.convert_ids_to_tokens(context)
        self._prefix_offset = 0  # tokens[prefix:read] decode to text already emitted
        self._read_offset = len(self._tokens)

    def _to_string(self, ids: list[int]) -> str:
        return self._tok.convert_tokens_to_string(self._tok.convert_ids_to_tokens(ids))

    def step(self, token_id: int) -> str:
        if token_id in self._skip_ids:
            return ""
        self._tokens.append(self._tok.convert_ids_to_tokens(token_id) or "")
        prefix = self._tok.convert_tokens_to_string(self._tokens[self._prefix_offset:self._read_offset])
        text = self._tok.convert_tokens_to_string(self._tokens[self._prefix_offset:])
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        if self._prefix_offset > _WINDOW:  # drop what no later decode will look at
            del self._tokens[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return text[len(prefix):]

    def decode_all(self, token_ids: list[int]) -> str:
        return "".join(self.step(t) for t in token_ids) + self.flush()

    def flush(self) -> str:
        prefix = self._tok.convert_tokens_to_string(self._tokens[self._prefix_offset:self._read_offset])
        text = self._tok.convert_tokens_to_string(self._tokens[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._tokens)
        return text[len(prefix):] if len(text) > len(prefix) else ""
