"""Structured outputs: constrain a request's output to a JSON schema, regex, choice or grammar.

Modules (each says its contract): `params.py` (StructuredOutputsParams), `request_fields.py`
(request fields -> params), `tool_choice.py` (tool_choice -> params), `compiler.py` (xgrammar
compilation on a thread pool, cached), `matcher.py` (one request's grammar state), `bitmask.py`
(the step's packed mask: fill on the CPU, apply to the logits; Triton in
kubeinfer/kernels/token_bitmask.py), `grammar_batch.py` (many rows' accepts and fills in one
xgrammar batch call), `manager.py` (the engine's side).

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
  (sample_step.py) launches the forward, then on the sampling rank reads the previous step's
  tokens (under async scheduling that step is still unresolved: this waits for its event while
  the GPU runs this step's forward), and `manager.grammar_bitmask(req_ids, known)` feeds the
  matchers the tokens they have not seen and fills the rows on the CPU;
  `apply_bitmask(logits, bitmask_on_device, rows)` runs before the sampler. So constrained
  requests keep async scheduling, and the mask work overlaps the forward.
- Scheduler.resolve: `manager.accept_resolved([(req_id, index, token), ...])` once a step: a token the runner already fed is not
  fed again (tokens are keyed by output index, once each, in order); False ends the request as
  failed; `matcher.is_terminated()` ends it as stopped (EOS is only allowed where the grammar may
  end, so the usual EOS check agrees). A token sampled after a request's end is dropped before
  any matcher sees it. Nothing takes an accepted token back: preemption keeps a request's outputs
  (its KV cache is recomputed, its matcher kept), stop strings end the request; so the engine
  never calls `matcher.rollback` (kept, and tested, for speculative decoding).
"""
