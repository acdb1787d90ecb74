"""POST /v1/chat/completions: messages through the chat template, then the engine."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
from typing import Any, AsyncIterator, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from kubeinfer.engine.errors import RequestError, RequestFailedError
from kubeinfer.engine.multimodal import MultiModalInputs, has_media_parts
from kubeinfer.engine.server.chat_message_parser import ChatMessageParser, tool_mode
from kubeinfer.engine.server.errors import REQUEST_FAILED_MESSAGE, APIError
from kubeinfer.engine.server.protocol import ChatCompletionRequest, ChatMessage
from kubeinfer.engine.protocol import EngineClient
from kubeinfer.engine.server.drain import first_of
from kubeinfer.engine.server.engine_stream import generate, until_disconnect
from kubeinfer.engine.server.logprobs_format import TokenText, chat_logprobs, prompt_logprobs_json
from kubeinfer.engine.server.model_lifecycle import ModelLifecycle
from kubeinfer.engine.server.request_prologue import (check_token_ids, context_budget,
                                                      start_generation)
from kubeinfer.engine.server.response_parts import now, random_id, usage
from kubeinfer.engine.server.sse import SSEResponse

logger = logging.getLogger("kubeinfer.server")


def _message_dict(i: int, m: ChatMessage) -> dict:
    """A message as chat templates expect it: content a string, text parts joined by newlines."""
    d: dict[str, Any] = {"role": m.role}
    if isinstance(m.content, list):
        texts = []
        for j, part in enumerate(m.content):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "text":
                raise APIError(f"messages[{i}].content[{j}]: a text part needs a string `text`.",
                               400, param=f"messages.{i}.content.{j}.text")
            else:
                raise APIError(f"messages[{i}].content[{j}]: content part type {kind!r} is not "
                               "supported; this model takes only 'text' parts.",
                               400, param=f"messages.{i}.content.{j}.type")
        d["content"] = "\n".join(texts)
    else:
        d["content"] = m.content if m.content is not None else ""
    for key in ("name", "tool_call_id", "tool_calls"):
        if getattr(m, key) is not None:
            d[key] = getattr(m, key)
    return d


def chat_template_for(lifecycle: ModelLifecycle, requested: str | None) -> str | None:
    """The template to render with: the server's (the model's or --chat-template), or the
    request's `chat_template` (vLLM's field) when the server trusts request templates.

    A request template is code the server runs; transformers renders it in jinja2's immutable
    sandbox, but a sandbox does not bound time or memory, so it takes an explicit opt-in (as
    vLLM's --trust-request-chat-template). Refused, never silently replaced by the model's.
    """
    if requested is None:
        return lifecycle.config.model.chat_template
    if not lifecycle.trust_request_chat_template:
        raise APIError("chat_template in the request is refused: this server renders only its own "
                       "chat template (the model's, or --chat-template). Leave chat_template out, "
                       "or start the server with --trust-request-chat-template.", 400,
                       param="chat_template")
    return requested


def _template_kwargs(tokenizer: Any, template_kwargs: dict | None) -> dict:
    """chat_template_kwargs, less any that would change apply_chat_template itself (tokenize,
    return_dict, chat_template, ...): those are the server's to set, not template variables."""
    kwargs = dict(template_kwargs or {})
    reserved = sorted(set(kwargs) & set(inspect.signature(tokenizer.apply_chat_template).parameters))
    if reserved:
        raise APIError(f"chat_template_kwargs may not set {', '.join(reserved)}: these are "
                       "parameters of the renderer, not template variables.", 400,
                       param="chat_template_kwargs")
    return kwargs


def render_chat(engine: EngineClient, chat_template: str | None, messages: list[ChatMessage], *,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                template_kwargs: dict | None = None, tools: list[dict] | None = None,
                from_request: bool = False) -> list[int]:
    """Token ids of the conversation rendered by `chat_template` (None: the model's).
    `from_request`: the template is the request's own, so its failures name `chat_template`."""
    if not messages:
        raise APIError("messages is empty: send at least one message.", 400, param="messages")
    if engine.tokenizer is None:
        raise APIError("chat needs the model's tokenizer and chat template, and this server was "
                       "started with --skip-tokenizer-init: use /v1/completions with token ids.",
                       400, param="messages")
    conversation = [_message_dict(i, m) for i, m in enumerate(messages)]
    if continue_final_message and add_generation_prompt:
        add_generation_prompt = False  # continuing the last message means no new turn
    tokenizer = engine.tokenizer
    kwargs = _template_kwargs(tokenizer, template_kwargs)
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, chat_template=chat_template,
            tools=tools or None, **kwargs)
    except Exception as e:  # noqa: BLE001 - template errors are the request's (or the setup's) fault
        name = type(e).__name__
        if from_request:
            raise APIError(f"the chat_template in the request could not render these messages: "
                           f"{name}: {e}", 400, param="chat_template") from None
        if "chat_template" in str(e) or "chat template" in str(e):
            raise APIError("this model has no chat template: start the server with "
                           "--chat-template FILE, or use /v1/completions.", 400,
                           param="messages") from None
        raise APIError(f"the chat template could not render these messages: {name}: {e}", 400,
                       param="messages") from None
    if not isinstance(text, str):
        raise APIError("the chat template did not render to text.", 400,
                       param="chat_template" if from_request else "messages")
    ids = tokenizer.encode(text, add_special_tokens=False)
    check_token_ids(ids, len(tokenizer), "messages")
    return ids


async def render_media_chat(lifecycle: ModelLifecycle, req: ChatCompletionRequest
                            ) -> MultiModalInputs:
    """A conversation with image parts -> the processor's ids and images, on the preprocessor's
    threads (fetching and decoding never run on the event loop). Bad media is a 400 naming the
    part; a text-only model refuses images."""
    mm = lifecycle.mm
    unsupported = [name for name in ("tools", "chat_template_kwargs") if getattr(req, name)]
    if req.continue_final_message:
        unsupported.append("continue_final_message")
    if unsupported:
        raise APIError(f"{', '.join(unsupported)} cannot be combined with image parts yet; send "
                       "the images without them.", 400, param=unsupported[0])
    try:
        if mm is None:
            raise RequestError("this server takes no images", "messages")
        template = chat_template_for(lifecycle, req.chat_template)
        return await asyncio.wrap_future(mm.submit_chat(req.messages, template,
                                                        req.add_generation_prompt))
    except RequestError as e:
        raise APIError(str(e.args[0] if e.args else e), 400, param=e.param) from None
    except RequestFailedError as e:
        logger.error("preprocessing a chat request's images failed: %s", e)
        raise APIError(REQUEST_FAILED_MESSAGE, 500) from None


def _takes_media_path(lifecycle: ModelLifecycle, req: ChatCompletionRequest) -> bool:
    """Images go through the model's processor; so does a text-only conversation with a
    vision-language model (its processor's template is the one its tokens were trained on),
    unless the request needs what only the text path renders (tools, template kwargs)."""
    if has_media_parts(req.messages):
        return True
    plain = not (req.tools or req.chat_template_kwargs or req.continue_final_message)
    return plain and lifecycle.mm is not None and lifecycle.mm.is_multimodal


async def create_chat_completion(lifecycle: ModelLifecycle, req: ChatCompletionRequest,
                                 raw: Request) -> Response:
    engine, model, params = start_generation(lifecycle, req)
    make_parser = _message_parsers(lifecycle, engine, req)
    tool_parser = make_parser().tool_parser
    if tool_parser is not None and not tool_parser.skip_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)  # its markers are special
    mm_inputs = None
    if _takes_media_path(lifecycle, req):
        mm_inputs = await render_media_chat(lifecycle, req)
        prompt_ids = mm_inputs.prompt_token_ids
    else:
        prompt_ids = render_chat(engine, chat_template_for(lifecycle, req.chat_template),
                                 req.messages, add_generation_prompt=req.add_generation_prompt,
                                 continue_final_message=req.continue_final_message,
                                 template_kwargs=req.chat_template_kwargs, tools=req.tools,
                                 from_request=req.chat_template is not None)
    max_tokens = context_budget(len(prompt_ids), params.max_tokens, engine.max_model_len,
                                "messages")
    params = dataclasses.replace(params, max_tokens=max_tokens)
    request_id = random_id("chatcmpl")
    if lifecycle.log_requests:
        logger.info("request %s: %d prompt tokens, %s", request_id, len(prompt_ids), params)
    outputs = generate(engine, prompt_ids, params, request_id, priority=req.priority,
                       mm_inputs=mm_inputs)
    header = {"id": request_id, "object": "chat.completion", "created": now(), "model": model}
    text = TokenText(engine.tokenizer, req.return_tokens_as_token_ids)
    if req.stream:
        header["object"] = "chat.completion.chunk"
        return SSEResponse(_stream(req, prompt_ids, outputs, header, text, make_parser),
                           lifecycle.drain)
    result = await until_disconnect(raw, first_of(_collect(req, prompt_ids, outputs, header, text,
                                                           make_parser), lifecycle.drain))
    if result is None:
        return Response(status_code=499)  # nobody is listening
    return JSONResponse(result)


def _message_parsers(lifecycle: ModelLifecycle, engine: EngineClient,
                     req: ChatCompletionRequest) -> Callable[[], ChatMessageParser]:
    """A maker of one ChatMessageParser per choice, for the request's tool mode and the server's
    parsers. tool_choice "auto" with tools needs --enable-auto-tool-choice (as vLLM): without a
    parser the calls would come back as text the client does not expect."""
    mode = tool_mode(req.tools, req.tool_choice)
    if mode == "auto" and not lifecycle.enable_auto_tool_choice:
        raise APIError('tool_choice "auto" (the default when tools are given) needs a server '
                       'started with --enable-auto-tool-choice and --tool-call-parser NAME; send '
                       'tool_choice "required", a named function or "none" instead.', 400,
                       param="tool_choice")
    parsers = lifecycle.__dict__.setdefault("_message_parsers", {})
    key = id(engine.tokenizer)
    if key not in parsers:
        tool_parser = reasoning_parser = None
        if lifecycle.tool_call_parser:
            from kubeinfer.engine.tool_parsers.registry import get_tool_parser

            tool_parser = get_tool_parser(lifecycle.tool_call_parser)(engine.tokenizer)
        if lifecycle.config.model.reasoning_parser:
            from kubeinfer.engine.reasoning.registry import get_reasoning_parser

            reasoning_parser = get_reasoning_parser(lifecycle.config.model.reasoning_parser)(
                engine.tokenizer)
        parsers.clear()  # one tokenizer per engine: a reloaded engine replaces the old parsers
        parsers[key] = (tool_parser, reasoning_parser)
    tool_parser, reasoning_parser = parsers[key]
    name = None
    if mode == "named":
        name = req.tool_choice["function"]["name"]
    return lambda: ChatMessageParser(mode, tool_parser if mode == "auto" else None,
                                     reasoning_parser, name)


async def _collect(req: ChatCompletionRequest, prompt_ids: list[int], outputs: AsyncIterator,
                   header: dict, text: TokenText,
                   make_parser: Callable[[], ChatMessageParser]) -> dict:
    texts: dict[int, list[str]] = {i: [] for i in range(req.n)}
    token_ids: dict[int, list[int]] = {i: [] for i in range(req.n)}
    lps: dict[int, list[dict]] = {i: [] for i in range(req.n)}
    final: dict[int, Any] = {}
    cached = 0
    prompt_logprobs = None  # every sample's first output carries the same
    async with contextlib.aclosing(outputs):
        async for _, out in outputs:
            if out.prompt_logprobs is not None:
                prompt_logprobs = out.prompt_logprobs
            texts[out.index].append(out.new_text)
            token_ids[out.index].extend(out.new_token_ids)
            if req.logprobs and out.new_logprobs:
                lps[out.index].extend(chat_logprobs(out.new_token_ids, out.new_logprobs, text))
            cached = out.num_cached_tokens
            if out.finished:
                final[out.index] = out
    choices = []
    for i in range(req.n):
        out = final.get(i)
        parser = make_parser()
        choices.append({
            "index": i,
            "message": parser.message("".join(texts[i])),
            "logprobs": {"content": lps[i]} if req.logprobs else None,
            "finish_reason": parser.finish_reason(out.finish_reason if out else None),
            "stop_reason": out.stop_reason if out else None,
            **({"token_ids": token_ids[i]} if req.return_token_ids else {}),
        })
    num_completion = sum(o.num_output_tokens for o in final.values())
    body = {**header, "choices": choices,
            "usage": usage(len(prompt_ids), num_completion, cached),
            "prompt_logprobs": prompt_logprobs_json(prompt_logprobs)}
    if req.return_token_ids:
        body["prompt_token_ids"] = prompt_ids
    return body


async def _stream(req: ChatCompletionRequest, prompt_ids: list[int], outputs: AsyncIterator,
                  header: dict, text: TokenText,
                  make_parser: Callable[[], ChatMessageParser]) -> AsyncIterator[dict]:
    parsers = [make_parser() for _ in range(req.n)]
    # OpenAI opens each choice with a role-only delta
    for i in range(req.n):
        opening = {**header, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
        if req.return_token_ids:
            opening["prompt_token_ids"] = prompt_ids
        if req.continuous_usage:
            opening["usage"] = usage(len(prompt_ids), 0, 0)
        yield opening
    num_tokens: dict[int, int] = {}
    cached = 0
    async with contextlib.aclosing(outputs):
        async for _, out in outputs:
            num_tokens[out.index] = out.num_output_tokens
            cached = out.num_cached_tokens
            lp = None
            if req.logprobs and out.new_logprobs:
                lp = {"content": chat_logprobs(out.new_token_ids, out.new_logprobs, text)}
            parser = parsers[out.index]
            delta = parser.feed(out.new_text) if out.new_text else None
            if out.finished:
                delta = _merge_deltas(delta, parser.finish())
            if delta is None and not out.finished and lp is None and not req.return_token_ids:
                continue  # held back: part of a character, a tag or a tool call's start
            choice = {"index": out.index,
                      "delta": delta or {},
                      "logprobs": lp,
                      "finish_reason": parser.finish_reason(out.finish_reason)
                      if out.finished else None}
            if req.return_token_ids:
                choice["token_ids"] = list(out.new_token_ids)
            if out.finished:
                choice["stop_reason"] = out.stop_reason
            chunk = {**header, "choices": [choice]}
            if req.continuous_usage:
                chunk["usage"] = usage(len(prompt_ids), sum(num_tokens.values()), cached)
            yield chunk
    if req.include_usage:
        yield {**header, "choices": [],
               "usage": usage(len(prompt_ids), sum(num_tokens.values()), cached)}


def _merge_deltas(a: dict | None, b: dict | None) -> dict | None:
    """One delta of two (text pieces joined, tool-call pieces in order)."""
    if a is None or b is None:
        return a or b
    merged = dict(a)
    for key, value in b.items():
        merged[key] = merged[key] + value if key in merged else value
    return merged
