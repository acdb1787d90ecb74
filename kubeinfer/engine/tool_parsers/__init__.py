"""Tool calling with `tool_choice: "auto"`: parsers that find tool calls in a model's text output.

`registry.get_tool_parser(name)(tokenizer)` gives a parser (hermes, llama3_json, mistral,
pythonic; one module each). How the server uses one (server/chat_message_parser.py):

- non-streamed: `parser.extract_tool_calls(text)` -> ExtractedToolCalls(content, tool_calls);
  each ToolCall has name, arguments (JSON text) and an id;
- streamed: one `stream.ToolCallStream(parser)` per choice; `feed(delta_text)` and, at the end,
  `finish()` return DeltaMessages (content and/or DeltaToolCalls with index, id, name, argument
  fragments); finish_reason is "tool_calls" when `stream.tools_called`;
- `parser.skip_special_tokens` is what the detokenizer must use for the parser's markers to
  survive (False for mistral and llama3_json).
`tool_choice: "required"` or a named function is not parsed here: it is a structured-output
constraint (engine/structured_output/tool_choice.py).
"""
