"""`prefix_key`: what prefix-hash hashes for one request.

chat          the text of the conversation's first user message (its text parts joined), first
              `chars` characters: it stays the same as the conversation grows, so every turn of one
              conversation maps to the same replica, where its prefix is cached. A system prompt
              shared by every conversation is left out, or it would send them all to one replica.
              No user message: the messages' text as a whole.
completions   the prompt's first `chars` characters; a token-id prompt: its first `tokens` ids; a
              batch: its first prompt.
embeddings    `input`, the same way.

The model name is part of the key. A body without a usable prompt gives None (least-load then).
"""
from __future__ import annotations

from typing import Any


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _chat_prefix(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    msgs = [m for m in messages if isinstance(m, dict)]
    for m in msgs:
        if m.get("role") == "user":
            return _text(m.get("content"))
    return "".join(_text(m.get("content")) for m in msgs) or None


def _prompt_prefix(prompt: Any, chars: int, tokens: int) -> str | None:
    if isinstance(prompt, str):
        return prompt[:chars]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return "ids:" + ",".join(str(t) for t in prompt[:tokens])
        return _prompt_prefix(prompt[0], chars, tokens)
    return None


def prefix_key(body: dict, *, chars: int, tokens: int) -> str | None:
    model = body.get("model")
    if "messages" in body:
        prefix = _chat_prefix(body["messages"])
        prefix = prefix[:chars] if prefix is not None else None
    elif "prompt" in body:
        prefix = _prompt_prefix(body["prompt"], chars, tokens)
    else:
        prefix = _prompt_prefix(body.get("input"), chars, tokens)
    if prefix is None:
        return None
    return f"{model}\x00{prefix}"
