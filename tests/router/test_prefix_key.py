"""What prefix-hash hashes: a conversation's first user message, a prompt's first characters or ids."""
from __future__ import annotations

import pytest

from kubeinfer.router.prefix_key import prefix_key

SYSTEM = {"role": "system", "content": "shared system prompt"}


def key(body):
    return prefix_key({"model": "m", **body}, chars=8, tokens=3)


@pytest.mark.parametrize("a, b, same", [
    # a conversation keeps its key as it grows
    ({"messages": [SYSTEM, {"role": "user", "content": "hello there"}]},
     {"messages": [SYSTEM, {"role": "user", "content": "hello there"}, {"role": "assistant", "content": "x"},
                   {"role": "user", "content": "more"}]}, True),
    # two conversations under one system prompt do not share a key
    ({"messages": [SYSTEM, {"role": "user", "content": "alpha"}]},
     {"messages": [SYSTEM, {"role": "user", "content": "beta"}]}, False),
    # text parts count like a string
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                                {"type": "image_url", "image_url": {"url": "x"}}]}]},
     {"messages": [{"role": "user", "content": "hello"}]}, True),
    # only the first `chars` characters
    ({"prompt": "abcdefgh-1"}, {"prompt": "abcdefgh-2"}, True),
    ({"prompt": "abcdefgX"}, {"prompt": "abcdefgY"}, False),
    # token ids: the first `tokens`
    ({"prompt": [1, 2, 3, 4]}, {"prompt": [1, 2, 3, 5]}, True),
    ({"prompt": [1, 2, 4]}, {"prompt": [1, 2, 3]}, False),
    # a batch: its first prompt
    ({"prompt": ["abcdefgh", "zzz"]}, {"prompt": "abcdefgh"}, True),
    ({"input": "abcdefgh-x"}, {"input": "abcdefgh-y"}, True),
])
def test_keys(a, b, same):
    assert (key(a) == key(b)) is same
    assert key(a) is not None


def test_model_is_part_of_the_key():
    body = {"prompt": "same"}
    assert prefix_key({"model": "a", **body}, chars=8, tokens=3) != prefix_key({"model": "b", **body}, chars=8, tokens=3)


@pytest.mark.parametrize("body", [{}, {"prompt": 5}, {"messages": "x"}, {"prompt": []}, {"input": None},
                                  {"messages": [{"role": "user", "content": None}] * 0}])
def test_no_usable_prompt_gives_none(body):
    assert key(body) is None
