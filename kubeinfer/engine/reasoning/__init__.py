"""Reasoning output: `--reasoning-parser deepseek_r1|qwen3` splits `<think>...</think>` off into
`reasoning_content`, as vLLM.

How the engine and server use it (server/chat_message_parser.py, engine/llm_engine.py):
- engine start: `parser = registry.get_reasoning_parser(name)(tokenizer)` (ConfigError if the
  tokenizer lacks the tags);
- server, non-streamed: `parser.extract_reasoning(text)` -> (reasoning_content, content); the tool
  parser, if any, then reads `content`;
- server, streamed: one `stream.ReasoningStream(parser)` per choice; its DeltaMessages carry
  `delta.reasoning_content` and `delta.content` (content then feeds a ToolCallStream, if any);
- structured outputs: pass the parser as `reasoning` to StructuredOutputMatcher, with the prompt
  ids; the constraint applies from the token after the end tag (`is_reasoning_end`).
"""
