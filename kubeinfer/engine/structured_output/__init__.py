"""Structured outputs: constrain a request's output to a JSON schema, regex, choice or grammar.

Modules (each says its contract): `params.py` (StructuredOutputsParams), `request_fields.py`
(request fields -> params), `tool_choice.py` (tool_choice -> params), `compiler.py` (xgrammar
compilation on a thread pool, cached), `matcher.py` (one request's grammar state), `bitmask.py`
(the step's packed mask: fill on the CPU, apply to the logits; Triton in
kubeinfer/kernels/token_bitmask.py).

How the engine calls it (wired in: manager.py holds the engine side):

- Params: `SamplingParams.structured_outputs: StructuredOutputsParams | None`. The server builds it
  with `request_fields.from_request(body)` (or `tool_choice.tool_choice_params(tools, choice)`
  for tool_choice "required" / a named function); the offline API with `request_fields.coerce`.
- Engine start (driver rank only): `compiler = StructuredOutputCompiler(tokenizer, vocab_size,
  eos_token_ids)`; the server may validate early with `await asyncio.wrap_future(
  compiler.submit(params))` (RequestError -> 400).
- add_request: `req.grammar_future = compiler.submit(params)`. The scheduler schedules the request
  only once `req.grammar_future.done()`; a RequestError from it finishes the request with that
  error; otherwise each sample gets `StructuredOutputMatcher(future.result(), reasoning_parser,
  prompt_token_ids)`.
- Each step: the SchedulerOutput lists the constrained requests' ids in batch order. The runner
  launches the forward, then `fill_bitmask(matchers, bitmask)` on the CPU while the GPU works, then
  `apply_bitmask(logits, bitmask_on_device, rows)` before the sampler. With async scheduling a step
  with constrained requests must have the previous step's tokens accepted first (their masks depend
  on them), so it resolves before filling, as penalties do today.
- Scheduler.update (or resolve): `matcher.accept_tokens(new_token_ids)`; False ends the request as
  failed; `matcher.is_terminated()` ends it as stopped (EOS is only allowed where the grammar may
  end, so the usual EOS check agrees). Tokens the scheduler takes back (dropped placeholders,
  preempted output that is recomputed) are `matcher.rollback(n)`; stop strings need nothing.
"""
