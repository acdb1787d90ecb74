"""`StructuredOutputCompiler`: constraints -> xgrammar `CompiledGrammar`s, on a thread pool, cached.

One per engine (the driver only under tensor parallelism: only it samples). Compiling a schema
takes milliseconds to seconds, so it never runs on the engine loop: `submit()` returns a Future at
once; the scheduler keeps the request waiting until the Future is done (`Future.done()` is a cheap
poll) and then makes its matcher with `matcher.StructuredOutputMatcher(future.result())`. The
server can `await asyncio.wrap_future(compiler.submit(params))` before adding a request, so an
invalid schema is a 400 and the engine's later `submit` of the same constraint is a cache hit.

Compiled grammars are cached by `StructuredOutputsParams.key()` (kind, spec, whitespace options),
least recently used first out; failures are not cached. A constraint that does not compile raises
`RequestError` naming the request field, from the Future (or from `compile()`).

xgrammar gap, closed here (still present in xgrammar 0.2.8): a string with minLength/maxLength
compiles to "any character but quote, backslash, CR and LF, m to n times", which admits raw
control characters (U+0000-U+001F) that JSON forbids, so a model could produce a reply `json.loads`
rejects. Before compiling, such a string (one without its own `pattern` or `format`) gets the
equivalent `pattern` `^[^\x00-\x1f"\\]{m,n}$` instead of its length bounds: the same strings
minus the control characters (xgrammar applies a pattern to the decoded string; neither form
allows escapes). tests/engine/structured_output/test_string_lengths.py pins both behaviours.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.structured_output.params import StructuredOutputsParams

# xgrammar's C++ errors start with "[12:00:00] /project/cpp/file.cc:123: " and sometimes a failed
# check's condition; neither helps the person who sent the schema.
_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: .*? is false: )?")


class StructuredOutputCompiler:
    """Compiles constraints for one tokenizer and vocabulary.

    Args:
        tokenizer: the engine's Hugging Face tokenizer.
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary; the
            extra ids are never allowed).
        eos_token_ids: the ids that end generation; the mask allows them only where the grammar
            may end.
        max_workers: compile threads (compiling is CPU-bound in C++ and releases the GIL).
        cache_size: compiled grammars kept.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int],
                 max_workers: int = 2, cache_size: int = 256):
        self.vocab_size = vocab_size
        # imported here, not at module level: an engine without constraints needs no xgrammar
        import xgrammar as xgr

        self._xgr_module = xgr
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(set(eos_token_ids)) or None)
        # xgrammar's own cache is off: ours keys on whitespace options too and holds Futures, so
        # two requests with one new schema compile it once.
        self._xgr = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_workers,
                                        cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A Future of the compiled grammar; its exception is a RequestError for a bad constraint."""
        key = params.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile_or_forget, params)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return future

    def compile(self, params: StructuredOutputsParams, timeout: float | None = None) -> Any:
        """submit() and wait: the compiled grammar, or the RequestError."""
        return self.submit(params).result(timeout)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile_or_forget(self, params: StructuredOutputsParams) -> Any:
        try:
            return self._compile(params)
        except BaseException:
            # Forget before the Future completes, so a caller who saw the error and submits again
            # gets a fresh attempt, never the cached failure.
            with self._lock:
                self._cache.pop(params.key(), None)
            raise

    def _compile(self, params: StructuredOutputsParams) -> Any:
        kind, param = params.kind, params.param
        try:
            if kind == "json":
                return self._compile_json(params, json.loads(params.json), strict=True)
            if kind == "json_object":
                return self._compile_json(params, {"type": "object"}, strict=False)
            if kind == "regex":
                return self._xgr.compile_regex(params.regex)
            if kind == "choice":
                # A JSON string literal is also an EBNF string literal (same escapes).
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
                return self._xgr.compile_grammar(f"root ::= {alternatives}")
            if kind == "grammar":
                return self._compile_grammar(params.grammar)
            return self._compile_structural_tag(json.loads(params.structural_tag))
        except RequestError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError/its own types
            what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
                    "choice": "choice", "grammar": "grammar", "structural_tag": "structural tag"}[kind]
            raise RequestError(f"{param}: the {what} is not valid or not supported: "
                               f"{_clean(str(e))}", param) from None

    def _compile_json(self, params: StructuredOutputsParams, schema: dict, strict: bool) -> Any:
        _check_json_schema(schema, params.param)
        schema = bounded_strings_as_patterns(schema)
        any_whitespace = not params.disable_any_whitespace
        return self._xgr.compile_json_schema(
            json.dumps(schema), any_whitespace=any_whitespace, strict_mode=strict,
            max_whitespace_cnt=params.max_whitespace_run if any_whitespace else None)

    def _compile_grammar(self, grammar: str) -> Any:
        # EBNF/GBNF rules are written `name ::= ...`; Lark's `name: ...` has no `::=`.
        if "::=" in grammar:
            return self._xgr.compile_grammar(grammar)
        return self._xgr.compile_grammar(self._xgr_module.Grammar.from_lark(grammar))

    def _compile_structural_tag(self, tag: dict) -> Any:
        if "structures" in tag:  # vLLM's shape: {"structures": [{begin, schema, end}], "triggers"}
            items = [self._xgr_module.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]),
                                           end=s["end"]) for s in tag["structures"]]
            return self._xgr.compile_structural_tag(items, tag["triggers"])
        return self._xgr.compile_structural_tag(tag)


def _check_json_schema(schema: dict, param: str) -> None:
    """A schema that is not a valid JSON Schema gets jsonschema's words, which name the keyword."""
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise RequestError(f"{param} is not a valid JSON schema at {where}: {e.message}",
                           param) from None


# keywords whose values are data, not subschemas: a dict there is never rewritten
_DATA_KEYWORDS = frozenset(("enum", "const", "default", "examples"))


def bounded_strings_as_patterns(schema: Any) -> Any:
    """A copy of `schema` in which each string schema with minLength/maxLength (and no pattern or
    format) says the same bounds as a pattern that excludes control characters (see the module's
    docstring)."""
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else bounded_strings_as_patterns(v) for k, v in schema.items()}
    if out.get("type") == "string" and ("minLength" in out or "maxLength" in out) \
            and "pattern" not in out and "format" not in out:
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{low},{high}}}$'
    return out


def _clean(message: str) -> str:
    lines = _CPP_PREFIX.sub("", message.strip()).strip().splitlines()
    return lines[0] if lines else "no detail given"
